"""The converter's timm source: ``jaxpull convert timm/<name>`` from a state_dict file or through
timm's pretrained weights, the preprocessing of timm's ``pretrained_cfg`` recorded, and one-line
errors before any file is written.

The files are real: timm's ``pvt_v2_b0`` (random weights, LayerNorm affines and biases randomised)
saved with ``torch.save(model.state_dict(), f)``, and for the pretrained path a Hugging Face cache
holding those weights as timm downloads them (``model.safetensors`` of ``timm/pvt_v2_b0.in1k``),
read in the hub's offline mode: this machine has no network. The conversions self-check at 32x32
(the smallest size the converter takes) to keep the compile short.
"""

from __future__ import annotations

import os
import subprocess
import sys

import huggingface_hub
import numpy as np
import pytest
import timm
import torch

import jaxpull
from conftest import images
from helpers import assert_logits_close, assert_one_line_error, run_in_process
from jaxpull.core import models
from jaxpull.core.layers import IMAGENET_MEAN, IMAGENET_STD
from jaxpull.core.preprocessing import Preprocessing
from jaxpull_convert import timm_source, torch_reference as R

# less codegen effort: each conversion compiles its forward once and runs it once (conftest.py)
pytestmark = pytest.mark.quick_compile

PVT = [a for a in models.ARCHITECTURES if a.startswith("timm/pvt_v2")]


def _b0(**options) -> torch.nn.Module:
    """timm's pvt_v2_b0 (random, seeded; LayerNorm affines and biases randomised), eval mode."""
    torch.manual_seed(0)
    tm = timm.create_model("pvt_v2_b0", **options).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _name, p in tm.named_parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return tm


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """State_dict files saved as a user saves them: pvt_v2_b0, and b0 built with options jaxpull refuses."""
    root = tmp_path_factory.mktemp("timm")
    out = {}
    for name, options in {"b0": {}, "grey": dict(in_chans=1), "features": dict(num_classes=0)}.items():
        out[name] = root / f"{name}.pth"
        torch.save(_b0(**options).state_dict(), out[name])
    return out


def test_preprocessing_of_timm_pretrained_cfgs():
    """timm's eval transform: crop = input size, short side floor(size / crop_pct), its filter."""
    for arch in PVT:
        prep, mean, std = timm_source.preprocessing(arch, timm_source.default_cfg(arch))
        assert prep == Preprocessing(224, 248, "bicubic") == models.get(arch).preprocessing  # floor(224 / 0.9)
        assert (mean, std) == (IMAGENET_MEAN, IMAGENET_STD)
    base = dict(input_size=(3, 224, 224), crop_pct=0.9, crop_mode="center", interpolation="bicubic", mean=(0.5,) * 3)
    base["std"] = (0.5,) * 3
    cases = {
        "crop_pct 1": (dict(crop_pct=1.0), Preprocessing(224, 224, "bicubic")),
        "288 px, 0.875, bilinear": (
            dict(input_size=(3, 288, 288), crop_pct=0.875, interpolation="bilinear"),
            Preprocessing(288, 329, "bilinear"),
        ),
        "no crop_pct: timm's 0.875": (dict(crop_pct=None), Preprocessing(224, 256, "bicubic")),
    }
    for name, (change, want) in cases.items():
        prep, mean, std = timm_source.preprocessing("timm/x", {**base, **change})
        assert prep == want and mean == std == (0.5,) * 3, name
    refused = {
        "crop_mode 'squash'": dict(crop_mode="squash"),
        "224x256 images": dict(input_size=(3, 224, 256)),
        "'nearest' interpolation": dict(interpolation="nearest"),
        "normalises 1 channels": dict(mean=(0.5,), std=(0.5,)),
    }
    for message, change in refused.items():
        with pytest.raises(ValueError, match=message):
            timm_source.preprocessing("timm/x", {**base, **change})


def _timm_logits(tm: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return tm(R.normalize(torch.from_numpy(x))).numpy()


def test_convert_a_timm_state_dict_file(files, tmp_path):
    """``jaxpull convert timm/pvt_v2_b0 --state-dict b0.pth``: the file records timm's preprocessing
    and normalisation; the loaded model computes timm's logits."""
    out = tmp_path / "b0.safetensors"
    proc = run_in_process("convert", "timm/pvt_v2_b0", "--state-dict", files["b0"], "--image-size", 32, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and "timm/pvt_v2_b0 from state_dict b0.pth" in proc.stdout
    model = jaxpull.load(out)
    assert model.arch == "timm/pvt_v2_b0" and model.num_classes == 1000 and model.class_name(1) == "goldfish"
    assert model.preprocessing == Preprocessing(224, 248, "bicubic")
    assert (model.spec.input_mean, model.spec.input_std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert '"crop_pct": 0.9' in model.metadata["timm_pretrained_cfg"] and "timm 1." in model.metadata["converted_with"]
    assert float(model.metadata["parity_max_rel"]) < 1e-4
    x = images(2, 32, seed=5)
    assert_logits_close(model(x), _timm_logits(_b0(), x))


def _hub_cache(root, repo: str, tensors: dict) -> None:
    """A Hugging Face cache holding ``model.safetensors`` of ``repo`` at main, as a download leaves it."""
    from safetensors.torch import save_file

    commit = "0" * 40
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "snapshots" / commit / "model.safetensors")


def test_without_a_source_flag_timm_fetches_its_pretrained_weights(tmp_path, monkeypatch):
    """``jaxpull convert timm/pvt_v2_b0 -o ...``: timm's default weights (``in1k``) through
    ``timm.create_model(pretrained=True)``. Offline with an empty cache: one line saying what to
    do; with the weights in the hub's cache: converted, the source naming timm's tag."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    out = tmp_path / "b0.safetensors"
    proc = run_in_process("convert", "timm/pvt_v2_b0", "-o", out)
    assert_one_line_error(proc, "could not obtain timm's pretrained weights pvt_v2_b0.in1k", "--state-dict FILE")
    assert not out.exists() and not list(tmp_path.glob("*.part"))

    _hub_cache(tmp_path / "hub", "timm/pvt_v2_b0.in1k", _b0().state_dict())
    proc = run_in_process("convert", "timm/pvt_v2_b0", "--image-size", 32, "-o", out)
    assert proc.returncode == 0, proc.stderr
    model = jaxpull.load(out)
    assert model.metadata["source"] == "timm pvt_v2_b0.in1k (timm/pvt_v2_b0.in1k)"
    assert model.preprocessing == Preprocessing(224, 248, "bicubic")
    x = images(2, 32, seed=6)
    assert_logits_close(model(x), _timm_logits(_b0(), x))


@pytest.mark.parametrize(
    "args,fragments",
    [
        (
            ("timm/pvt_v2_b9", "--state-dict", "b0"),
            (
                "unknown timm architecture 'timm/pvt_v2_b9'",
                "jaxpull converts timm/",
                "timm/pvt_v2_b0, ",
                "timm/pvt_v2_b5",
                "timm/resnet50d",
            ),
        ),
        (
            ("timm/pvt_v2_b1", "--state-dict", "b0"),
            (
                "the state_dict is not timm's pvt_v2_b1",
                "patch_embed.proj.weight (32, 3, 7, 7) where pvt_v2_b1 has (64, 3, 7, 7)",
                "it is a timm/pvt_v2_b0 state_dict: convert it as timm/pvt_v2_b0",
            ),
        ),
        (("timm/pvt_v2_b0", "--state-dict", "grey"), ("built with in_chans=1", "jaxpull explains RGB images")),
        (("timm/pvt_v2_b0", "--state-dict", "features"), ("no classifier (head.weight)", "num_classes=0")),
        (
            ("timm/pvt_v2_b0", "--weights", "in22k"),
            ("unknown timm weights 'in22k' for timm/pvt_v2_b0: use one of in1k",),
        ),
        (
            ("timm/pvt_v2_b0", "--state-dict", "b0", "--transform-input", "true"),
            ("timm/pvt_v2_b0 has no transform_input option",),
        ),
    ],
    ids=["unknown name", "another timm model", "in_chans", "num_classes=0", "unknown tag", "transform_input"],
)
def test_bad_input_is_one_line_before_any_file(files, tmp_path, args, fragments):
    out = tmp_path / "m.safetensors"
    proc = run_in_process("convert", *[files.get(a, a) for a in args], "-o", out)
    assert_one_line_error(proc, *fragments)
    assert list(tmp_path.iterdir()) == []


def test_loading_a_timm_model_and_pullbacks_import_neither_torch_nor_timm(tmp_path):
    """A converted timm model loads and explains without torch or timm (as test_api checks for torchvision's)."""
    from test_parity_pvt_v2 import small

    path = tmp_path / "pvt.safetensors"
    jaxpull.save(small()[1], path)
    code = (
        "import sys, numpy as np, jaxpull\n"
        f"m = jaxpull.load({str(path)!r})\n"
        "x = np.zeros((1, 32, 32, 3), np.float32)\n"
        "jaxpull.pullback(m, x, [1], rules='semantic').block_until_ready()\n"
        "assert m.arch == 'timm/pvt_v2_b0', m.arch\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'torchvision', 'timm'))\n"
        "assert not bad, bad[:5]\n"
    )
    env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="1")  # compiles once, runs once
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
