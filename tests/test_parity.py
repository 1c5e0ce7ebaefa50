"""Parity with PyTorch for every architecture: logits, vanilla gradients, excitation pullbacks,
and ascent, on randomly initialised torchvision models with random BatchNorm statistics.

Tolerances (float32): logits max |error| <= 1e-4 * max(1, max |logit|); maps cosine > 0.9999
and max |error| / max |reference| < 1e-3 (see helpers.py).
"""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import conftest
import jaxpull
from conftest import images, torch_and_jax
from helpers import assert_logits_close, assert_maps_close
from jaxpull_convert import torch_reference as R

pytestmark = pytest.mark.large_models  # one architecture per test: release it after each

ALL = [
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
    "vgg11",
    "vgg13",
    "vgg16",
    "vgg19",
    "vgg11_bn",
    "vgg13_bn",
    "vgg16_bn",
    "vgg19_bn",
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
    "alexnet",
    "mobilenet_v2",
]
# Representative members, for the more expensive checks.
CORE = ["resnet18", "resnet50", "vgg11_bn", "densenet121", "alexnet"]


def quick(*cases) -> list:
    """Pullback checks (an arch, or an (arch, ...) tuple each): compiled with less codegen effort
    (conftest.py), except VGG, whose wide convolutions make execution, not compilation, most of a test."""
    cases = [c if isinstance(c, tuple) else (c,) for c in cases]
    return [pytest.param(*c, marks=() if c[0].startswith("vgg") else pytest.mark.quick_compile) for c in cases]


TARGETS = np.array([[1, 7], [3, 500]])


NUMERIC = re.compile(r"match(es)?_(py)?torch|parity")  # test names of numerical parity checks
SHAPES = re.compile(r"parameter_shape|shapes")  # of shape-level conversion checks (full-size builders)


def parity_test_ids(session) -> list:
    """Node ids of every test in tests/test_parity*.py and test_real_model.py: this session's own
    collection when it holds those files whole (nothing deselected, no test named on the command
    line), else a ``pytest --collect-only`` of them (10 s)."""
    here = Path(__file__).parent
    files = sorted(p.name for p in here.glob("test_parity*.py")) + ["test_real_model.py"]
    ids = [item.nodeid for item in session.items if item.path.name in files]
    whole = not conftest.DESELECTED and not any("::" in a for a in session.config.args)
    if whole and {i.split("::")[0].rsplit("/", 1)[-1] for i in ids} == set(files):
        return ids
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            *[str(here / f) for f in files],
        ],
        capture_output=True,
        text=True,
        cwd=here.parent,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return [line.strip() for line in out.stdout.splitlines() if "::" in line]


def test_every_family_is_covered(request):
    """Every registered architecture is converted by a parity test (numerically, or by shapes for
    the full-size builders whose family is checked numerically at reduced sizes), and every family
    file has at least one numerical parity test; read from pytest's own collection of the
    tests/test_parity*.py files (and test_real_model.py: efficientnet_lite0's real weights), so a
    model added without a test fails here."""
    import jaxpull.core.models

    ids = parity_test_ids(request.session)
    assert ids
    numeric = [i for i in ids if NUMERIC.search(i.split("::")[1])]
    shapes = [i for i in ids if SHAPES.search(i.split("::")[1])]
    # the name in a parametrize id, or in the test's name between underscores
    mentions = lambda arch, tests: any(re.search(rf"[\[\-_]{arch}([\]\-]|_|$)", t) for t in tests)
    uncovered = [a for a in jaxpull.core.models.ARCHITECTURES if not mentions(a, numeric + shapes)]
    assert not uncovered, f"architectures without a parity test: {uncovered}"
    families = {}
    for arch, family in jaxpull.core.models.ARCHITECTURES.items():
        families.setdefault(family.torch_layout.__module__.rsplit(".", 1)[1], []).append(arch)
    unchecked = [
        f
        for f, archs in families.items()
        if not any(mentions(a, numeric) for a in archs) and not any(f"test_parity_{f}.py" in t for t in numeric)
    ]
    assert not unchecked, f"families without a numerical parity test: {unchecked}"


# The gate settings of each check, by name; every arch gets "paper", CORE "vanilla", FOLLOW_UP "follow-up".
PAPER = dict(temperature=0.3)  # sigmoid gate, soft pool weights (tp = t)
FOLLOW_UP = ["resnet18", "vgg11_bn", "densenet121"]
FOLLOW_UP_GATES = dict(temperature=0.6, pool_temperature=0.2, gate="normal_cdf", max_pool="detached")


@functools.cache  # a few hundred kB per arch
def compared(arch: str) -> dict:
    """The logits and every check's maps of ``arch`` on ``images(2, 64)`` for TARGETS, from one
    ``jaxpull.compare`` call (one compiled function, computed by whichever test asks first)."""
    methods = {"paper": PAPER}
    if arch in CORE:
        methods["vanilla"] = dict(rules="vanilla")
    if arch in FOLLOW_UP:
        methods["follow-up"] = FOLLOW_UP_GATES
    got = jaxpull.compare(torch_and_jax(arch)[1], images(2, 64), TARGETS, methods)
    return dict(logits=np.asarray(got.logits), **{k: np.asarray(v) for k, v in got.maps.items()})


@pytest.mark.parametrize("arch", quick(*ALL))
def test_logits_and_pullback_match_torch(arch):
    """Logits equal torchvision's; sigmoid-gated pullbacks (t=0.3) equal the torch rule's."""
    tm, model = torch_and_jax(arch)
    x = images(2, 64)
    xt = torch.from_numpy(x)
    with torch.no_grad():
        assert_logits_close(compared(arch)["logits"], tm(R.normalize(xt)))
    ref = R.pullback(R.gated(tm), xt, torch.from_numpy(TARGETS))
    assert compared(arch)["paper"].shape == (2, 2, 64, 64, 3)
    assert_maps_close(compared(arch)["paper"], ref)


@pytest.mark.parametrize("arch", quick(*CORE))
def test_vanilla_gradient_matches_torch_autograd(arch):
    tm = torch_and_jax(arch)[0]
    ref = R.pullback(tm, torch.from_numpy(images(2, 64)), torch.from_numpy(TARGETS))
    assert_maps_close(compared(arch)["vanilla"], ref)


@pytest.mark.parametrize("arch", quick(*FOLLOW_UP))
def test_follow_up_variant_matches_torch(arch):
    """Normal-CDF gate (t=0.6), separate pool temperature 0.2, detached softmax weights."""
    tm = torch_and_jax(arch)[0]
    ref = R.pullback(
        R.gated(tm, **FOLLOW_UP_GATES),
        torch.from_numpy(images(2, 64)),
        torch.from_numpy(TARGETS),
    )
    assert_maps_close(compared(arch)["follow-up"], ref)


@pytest.mark.parametrize("arch,size", quick(("vgg11", 160), ("densenet121", 128), ("alexnet", 100), ("resnet18", 97)))
def test_other_input_sizes(arch, size):
    """Any size torchvision accepts: adaptive pooling (VGG 160 -> 5x5 -> 7x7) and odd sizes."""
    tm, model = torch_and_jax(arch)
    x = images(1, size, seed=3)
    with torch.no_grad():
        assert_logits_close(model(x), tm(R.normalize(torch.from_numpy(x))))
    got = jaxpull.pullback(model, x, TARGETS[:1])
    ref = R.pullback(R.gated(tm), torch.from_numpy(x), torch.from_numpy(TARGETS[:1]))
    assert_maps_close(got, ref)


@pytest.mark.parametrize("arch", ["resnet18", "vgg11_bn"])
def test_ascent_matches_torch_pga(arch):
    """The paper's PGA (5 steps, alpha 20, eps 100, clip) equals a PyTorch loop, per pair."""
    tm, model = torch_and_jax(arch)
    x = images(2, 64, seed=4)
    got = jaxpull.ascent(model, x, TARGETS)
    ref = R.ascent(R.gated(tm), torch.from_numpy(x), torch.from_numpy(TARGETS))
    assert_maps_close(np.asarray(got) - x[:, None], ref - torch.from_numpy(x)[:, None])


@pytest.mark.parametrize(
    "options",
    [
        dict(relative_alpha=True, alpha=0.05, eps=None),
        dict(clip="none", eps=5.0, steps=3),
        dict(margin=0.1, loss="cross_entropy", steps=3),
        dict(loss="self_explain", steps=2, alpha=5.0),
    ],
    ids=["relative-alpha-no-eps", "no-clip-eps5", "margin-cross-entropy", "self-explain"],
)
def test_ascent_options_match_torch(options):
    tm, model = torch_and_jax("resnet18")
    x = images(1, 64, seed=5)
    got = jaxpull.ascent(model, x, TARGETS[:1], **options)
    torch_options = {**options, **({"clip": False} if options.get("clip") == "none" else {})}
    ref = R.ascent(R.gated(tm), torch.from_numpy(x), torch.from_numpy(TARGETS[:1]), **torch_options)
    assert_maps_close(np.asarray(got) - x[:, None], ref - torch.from_numpy(x)[:, None])


def test_vanilla_ascent_matches_torch():
    tm, model = torch_and_jax("resnet18")
    x = images(1, 64, seed=6)
    got = jaxpull.ascent(model, x, TARGETS[:1], rules="vanilla", steps=3)
    ref = R.ascent(tm, torch.from_numpy(x), torch.from_numpy(TARGETS[:1]), steps=3)
    # Hard gates make each step discontinuous in x: a float32 rounding difference that flips one
    # ReLU near z = 0 moves the next iterate slightly. Measured 1.5e-3 relative; cosine 0.9999995.
    assert_maps_close(np.asarray(got) - x[:, None], ref - torch.from_numpy(x)[:, None], rel_max=5e-3)
