"""GoogLeNet and Inception-v3: parity with torchvision, their auxiliary heads, transform_input,
and the per-weight preprocessing recorded in converted files.

The torch models are torchvision's, randomly initialised, with random BatchNorm statistics
(conftest.randomize_batchnorm) and He-normal convolutions: with torchvision's own initialisation
Inception-v3's logits reach 2.6e8, and with torch's default one the logits hardly depend on the
input (switching transform_input changes them by 1e-7), which would make the checks weak.
Tolerances are helpers.py's: logits 1e-4 relative, maps cosine > 0.9999 and 1e-3 relative.
"""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

import jaxpull
import jaxpull_convert
from conftest import images, randomize_batchnorm
from helpers import assert_logits_close, assert_maps_close, check_parity
from jaxpull.core import models
from jaxpull.core.preprocessing import Preprocessing
from jaxpull.core.rules import MaxPool
from jaxpull_convert import torch_reference as R

PLAIN_POOL = MaxPool(mode="plain")

# one architecture per test: release it after each; compiled with less codegen effort (conftest.py)
pytestmark = [pytest.mark.large_models, pytest.mark.quick_compile]

TARGETS = np.array([[1, 7], [3, 500]])


def build(arch: str, **options) -> torch.nn.Module:
    """torchvision's ``arch`` (aux heads on, transform_input on unless ``options`` say otherwise)."""
    torch.manual_seed(0)
    options = {"transform_input": True, "init_weights": False, **options}
    tm = torchvision.models.get_model(arch, weights=None, num_classes=1000, **options).eval()
    for m in tm.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    randomize_batchnorm(tm)
    return tm


def numpy_state_dict(tm: torch.nn.Module, drop: str = r"^$") -> dict:
    return {k: v.numpy() for k, v in tm.state_dict().items() if not re.search(drop, k)}


@pytest.mark.parametrize("arch,size", [("googlenet", 64), ("inception_v3", 75)])
def test_matches_torch(arch, size):
    """Logits (transform_input on and off), pullbacks (paper, follow-up), vanilla gradient, ascent.

    64x64 for GoogLeNet: its ceil-mode max-pools add a border window there (see the next test);
    75x75 is the smallest input torchvision's Inception-v3 accepts.
    """
    tm = build(arch)  # transform_input=True, as torchvision's pretrained weights
    aux = models.get(arch).auxiliary_keys
    assert any(re.search(aux, k) for k in tm.state_dict())  # converted with the aux heads present
    model = jaxpull_convert.from_torch_module(arch, tm)
    assert model.spec.transform_input and "auxiliary" in model.metadata["ignored_keys"]
    x = images(2, size)
    xt, tt = torch.from_numpy(x), torch.from_numpy(TARGETS)
    with torch.no_grad():
        logits = tm(R.normalize(xt))
    # logits, both presets' pullbacks (sigmoid t 0.3, soft pool weights; normal-CDF t 0.6,
    # detached pool weights tp 0.3), float64 vanilla gradients: one compiled function
    check_parity(tm, model, x, TARGETS)
    got = jaxpull.ascent(model, x[:1], TARGETS[:1])
    ref = R.ascent(R.gated(tm), xt[:1], tt[:1])
    # Five steps amplify float32 rounding: at these He-initialised activations (several units) the
    # pool softmax at tp = 0.3 is nearly an argmax, so a rounding difference in one step moves the
    # next iterate. Measured on GoogLeNet: rel err 1.7e-3, cosine 0.9999993 (single pullbacks: 1e-6).
    assert_maps_close(np.asarray(got) - x[:1, None], ref - xt[:1, None], rel_max=5e-3)

    # transform_input=False, from a state_dict without the aux heads (as torchvision's pretrained
    # model holds them after loading): same weights, logits that differ from the above.
    tm.transform_input = False
    plain = jaxpull_convert.from_state_dict(arch, numpy_state_dict(tm, aux), transform_input=False)
    assert not plain.spec.transform_input and "ignored_keys" not in plain.metadata
    with torch.no_grad():
        plain_logits = tm(R.normalize(xt))
    assert_logits_close(plain(x), plain_logits)
    assert np.abs(plain_logits.numpy() - logits.numpy()).max() > 0.1  # the option matters at these weights


def test_googlenet_ceil_mode_adds_windows_at_64():
    """At 64x64 GoogLeNet's first three max-pools (3x3/2, ceil mode) have one more row/column of
    windows than floor mode would, in torch and in jaxpull (the parity test above runs through them)."""
    tm = build("googlenet")
    # name: (input side at 64x64, extra windows of ceil mode)
    sizes = {"maxpool1": (32, 1), "maxpool2": (16, 1), "maxpool3": (8, 1), "maxpool4": (4, 0)}
    for name, (n, extra) in sizes.items():
        pool = getattr(tm, name)
        assert pool.ceil_mode
        ceil = PLAIN_POOL(np.zeros((1, n, n, 1), np.float32), pool.kernel_size, pool.stride, 0, ceil_mode=True)
        floor = PLAIN_POOL(np.zeros((1, n, n, 1), np.float32), pool.kernel_size, pool.stride, 0)
        assert ceil.shape[1] == pool(torch.zeros(1, 1, n, n)).shape[-1] == floor.shape[1] + extra, name


def test_inception_avg_pool_counts_the_padding():
    """Inception-v3's F.avg_pool2d(x, 3, 1, 1) divides by 9 at the border too (count_include_pad)."""
    from jaxpull.core.models.inception import avg_pool_3x3

    x = np.random.default_rng(0).normal(size=(1, 5, 5, 2)).astype(np.float32)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)
    ref = F.avg_pool2d(xt, 3, 1, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(avg_pool_3x3(x)), ref, atol=1e-6)
    excluded = F.avg_pool2d(xt, 3, 1, 1, count_include_pad=False).permute(0, 2, 3, 1).numpy()
    assert np.abs(ref - excluded).max() > 0.01


def test_conversion_drops_only_the_auxiliary_heads_and_names_mismatches():
    sd = numpy_state_dict(build("googlenet", transform_input=False))
    assert "aux1.fc2.weight" in sd
    model = jaxpull_convert.from_state_dict("googlenet", sd)
    assert model.spec.transform_input  # unset: torchvision's pretrained default
    del sd["inception4a.branch2.1.bn.running_var"]
    sd = {"aux3.fc.weight": np.zeros((2, 2), np.float32), **sd}  # not an auxiliary head of GoogLeNet
    with pytest.raises(jaxpull_convert.ConversionError) as e:
        jaxpull_convert.from_state_dict("googlenet", sd)
    assert "missing inception4a.branch2.1.bn.running_var" in str(e.value)
    assert "unexpected aux3.fc.weight" in str(e.value) and "aux1" not in str(e.value)
    with pytest.raises(jaxpull_convert.ConversionError, match="resnet18 has no transform_input option"):
        jaxpull_convert.from_state_dict(
            "resnet18", numpy_state_dict(torchvision.models.resnet18()), transform_input=True
        )


def test_preprocessing_is_recorded_and_explain_loads_299(tmp_path):
    """A converted Inception-v3 file records 342 / 299 and transform_input; `jaxpull explain` loads
    images at 299x299 for it (the real CLI)."""
    torch.manual_seed(0)
    pth = tmp_path / "inception.pth"
    torch.save(torchvision.models.inception_v3(init_weights=False).state_dict(), pth)  # with AuxLogits
    out = tmp_path / "inception_v3.safetensors"
    meta = jaxpull_convert.convert("inception_v3", out, state_dict=pth, image_size=75)
    assert float(meta["parity_max_rel"]) < 1e-4
    model = jaxpull.load(out)
    assert model.preprocessing == Preprocessing(crop_size=299, resize_size=342, interpolation="bilinear")
    assert model.spec.transform_input and model.metadata["transform_input"] == "true"
    assert model.metadata["crop_size"] == "299" and model.metadata["resize_size"] == "342"

    from jaxpull.files import images

    photo = images.sample_paths(["chelsea"])[0]
    arrays = tmp_path / "raw.npz"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxpull.shell.cli",
            "explain",
            str(photo),
            "--model",
            str(out),
            "--targets",
            "0",
            "--method",
            "pullback",
            "--steps",
            "1",
            "-o",
            str(tmp_path / "fig.png"),
            "--save-arrays",
            str(arrays),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    data = np.load(arrays)
    assert data["images"].shape == (1, 299, 299, 3) and data["pullback_diff"].shape == (1, 1, 299, 299, 3)
    np.testing.assert_array_equal(data["images"][0], images.load_image(photo, 299, 342))


def test_torchvision_weights_give_their_preprocessing():
    """Converting by --weights records the weights' own transforms() sizes (no download here)."""
    from jaxpull_convert import sources

    def sizes(arch, name):
        return sources.weights_preprocessing(sources.torchvision_weights(arch, name))

    assert (
        sizes("inception_v3", "DEFAULT")
        == Preprocessing(299, 342, "bilinear")
        == models.get("inception_v3").preprocessing
    )
    assert (
        sizes("googlenet", "IMAGENET1K_V1")
        == Preprocessing(224, 256, "bilinear")
        == models.get("googlenet").preprocessing
    )
    assert sizes("resnet50", "IMAGENET1K_V2") == Preprocessing(224, 232, "bilinear")
