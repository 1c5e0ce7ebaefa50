"""Converting the files users have, as they have them: a file torch saved for every family,
MNASNet's two versions, keys in any order (``.safetensors`` sorts them), training-wrapper
prefixes, files that are not state_dicts, what the loader accepts in a model file's metadata,
and the one resolver of model names. Each case runs the real API call or command on a file
written by torch (or by safetensors), and nothing may be written when it is refused."""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torchvision

import jaxpull
import jaxpull_convert
from helpers import LOGIT_REL, assert_one_line_error, run_in_process
from jaxpull.core import models, preprocessing
from jaxpull_convert import checkpoint, offline, pth, sources
from jaxpull_convert.testing import randomize_batchnorm

# less codegen effort: each converted model's forward is compiled once and run once (conftest.py)
pytestmark = pytest.mark.quick_compile

NUM_CLASSES = 10


class Case(NamedTuple):
    """One family's file: the architecture, the parity check's image size, builder keywords of the
    torch model, keywords of ``convert``, how the file is written (``torch.save``, keys reversed,
    or ``.safetensors``, whose keys are sorted), and whether the converter must read the image
    size off the file (no ``image_size`` given; recorded in the file's config)."""

    arch: str
    image_size: int = 32
    build: dict = {}
    convert: dict = {}
    save: str = "torch"
    size_from_file: bool = False


FILE_CASES = {
    "alexnet": Case("alexnet", 64),  # its pooling needs 63 px
    "convnext": Case("convnext_tiny", save="safetensors"),  # sorted: classifier.2 is not the last matrix
    "efficientnet": Case("efficientnet_b0"),
    "efficientnet_lite": Case("efficientnet_lite0"),
    "googlenet": Case("googlenet", 64, convert=dict(transform_input=False)),
    "maxvit": Case("maxvit_t", 224),  # its attention partitions fix the size
    "mobilenet": Case("mobilenet_v2"),
    "mobilenet_v3": Case("mobilenet_v3_small"),
    "regnet": Case("regnet_y_400mf"),
    "resnet": Case("resnet18"),
    "shufflenet": Case("shufflenet_v2_x0_5"),
    "squeezenet": Case("squeezenet1_1"),
    "swin": Case("swin_t"),
    "vgg": Case("vgg11"),
    # reversed: the head comes first; a ViT at another input size (like vit_h_14's 518 px SWAG
    # weights): the size comes from the position embeddings, the self-check runs torch at it
    "vit": Case("vit_b_32", build=dict(image_size=32), save="reversed", size_from_file=True),
}
# Families whose file conversion is tested by another test (densenet's and inception's take about
# 15 s each): file, test.
ELSEWHERE = {
    "densenet": ("test_cli.py", "test_densenet_legacy_keys_are_accepted"),
    "inception": ("test_parity_inception.py", "test_preprocessing_is_recorded_and_explain_loads_299"),
    "mnasnet": ("test_convert_files.py", "test_mnasnet_files_of_both_versions_convert"),
    "pvt_v2": ("test_timm_source.py", "test_convert_a_timm_state_dict_file"),
}
FULL_WIDTH = {"maxvit", "swin", "vgg", "vit", "convnext", "alexnet"}  # tens of millions of parameters


def torch_model(arch: str, seed: int = 0, size: int = 32, **build) -> torch.nn.Module:
    """torchvision's ``arch`` (EfficientNet-Lite0: efficientnet_lite_pytorch's) with NUM_CLASSES
    classes, random weights and BatchNorm statistics, in eval mode, its logits scaled (``scaled``)
    on ``size`` x ``size`` images."""
    torch.manual_seed(seed)
    if arch == "efficientnet_lite0":
        tm = sources.efficientnet_lite0_torch(NUM_CLASSES)
    else:
        tm = torchvision.models.get_model(arch, weights=None, num_classes=NUM_CLASSES, **build)
    randomize_batchnorm(tm, seed)
    return scaled(tm.eval(), arch, size)


def scaled(tm: torch.nn.Module, arch: str, size: int) -> torch.nn.Module:
    """``tm`` with its classifier scaled so that the logits of random ``size`` x ``size`` images
    reach 5: a comparison of logits then means something."""
    head = tm.get_submodule(models.get(arch).classifier)
    with torch.no_grad():
        if not head.weight.any():  # ViT's head starts at zero
            head.weight.normal_(0, 0.05)
        factor = 5 / tm(torch.randn(2, 3, size, size)).abs().max()
        head.weight.mul_(factor)
        if head.bias is not None:
            head.bias.mul_(factor)
    return tm


def save(state_dict, path: Path, how: str = "torch") -> Path:
    if how == "safetensors":
        import safetensors.torch

        safetensors.torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, path)
    elif how == "reversed":
        torch.save(OrderedDict(reversed(list(state_dict.items()))), path)
    else:
        torch.save(state_dict, path)
    return path


def assert_same_logits(tm: torch.nn.Module, out: Path, image_size: int) -> jaxpull.Model:
    """The converted file's logits against the torch model that was saved (not the converter's
    own reference), on images of ``image_size``."""
    model = jaxpull.load(out)
    err = jaxpull_convert.logit_parity(tm, model, image_size=image_size, seed=1)
    assert err["max_rel"] <= LOGIT_REL and err["scale"] > 0.1, err
    return model


def family_of(arch: str) -> str:
    return models.get(arch).torch_layout.__module__.rsplit(".", 1)[1]


def test_every_family_has_a_file_conversion_test():
    families = {family_of(a) for a in models.ARCHITECTURES}
    assert families == set(FILE_CASES) | set(ELSEWHERE), families ^ (set(FILE_CASES) | set(ELSEWHERE))
    assert all(family_of(case.arch) == family for family, case in FILE_CASES.items())
    here = Path(__file__).parent
    for file, test in ELSEWHERE.values():
        source = (here / file).read_text()
        body = source[source.index(f"def {test}(") :]
        body = body[: body.find("\ndef ", 1)]
        fixtures = re.search(r"def \w+\(([^)]*)\)", body).group(1).replace(" ", "").split(",")
        saved = [source[source.index(f"def {f}(") :].split("\ndef ", 2)[0] for f in fixtures if f"def {f}(" in source]
        assert any(re.search(r"\bsave\(", b) for b in [body, *saved]), (file, test, "no file saved by torch")
        assert "--state-dict" in body or "state_dict=" in body, (file, test)


@pytest.mark.parametrize(
    "family",
    [pytest.param(f, marks=pytest.mark.large_models) if f in FULL_WIDTH else f for f in sorted(FILE_CASES)],
)
def test_every_family_converts_from_a_file_torch_saved(family, tmp_path):
    case = FILE_CASES[family]
    tm = torch_model(case.arch, size=case.image_size, **case.build)
    path = save(
        tm.state_dict(), tmp_path / f"weights.{'safetensors' if case.save == 'safetensors' else 'pth'}", case.save
    )
    out = tmp_path / "m.safetensors"
    size = {} if case.size_from_file else {"image_size": case.image_size}
    meta = jaxpull_convert.convert(case.arch, out, state_dict=path, **size, **case.convert)
    assert float(meta["parity_max_rel"]) <= LOGIT_REL
    model = assert_same_logits(tm, out, case.image_size)
    assert model.arch == case.arch and model.num_classes == NUM_CLASSES
    if case.size_from_file:
        side = case.image_size
        assert f"{side}x{side}" in meta["parity_check"] and dict(model.spec.config) == {"image_size": side}


# --------------------------------------------------------------------------------------
# MNASNet: the version torch records with the state_dict picks the stem
# --------------------------------------------------------------------------------------


def mnasnet_version_1(arch: str) -> torch.nn.Module:
    """A version-1 MNASNet (torchvision's published mnasnet0_5 / mnasnet1_0 weights are): what
    torchvision's own loading builds for a version-1 state_dict, whose fixed-width stem it swaps in
    (``MNASNet._load_from_state_dict`` given version 1, here with no tensors to copy)."""
    tm = torch_model(arch)
    tm._load_from_state_dict({}, "", {"version": 1}, False, [], [], [])
    randomize_batchnorm(tm, 1)
    return scaled(tm.eval(), arch, 32)


def test_mnasnet_files_of_both_versions_convert(tmp_path):
    v1 = mnasnet_version_1("mnasnet0_5")
    v2 = torch_model("mnasnet0_5")
    assert v1.state_dict()._metadata[""]["version"] == 1 and v1.layers[0].out_channels == 32
    assert v2.state_dict()._metadata[""]["version"] == 2 and v2.layers[0].out_channels == 16
    for name, tm, config in (("v1", v1, {"version": 1}), ("v2", v2, {})):
        path = save(tm.state_dict(), tmp_path / f"{name}.pth")
        out = tmp_path / f"{name}.safetensors"
        jaxpull_convert.convert("mnasnet0_5", out, state_dict=path, image_size=32)
        model = assert_same_logits(tm, out, 32)
        assert dict(model.spec.config) == config
        assert model.metadata.get("config", "{}") == json.dumps(config)
        # jaxpull's own reader (the one used without torch) carries the version too
        assert pth.read_pth(path).metadata[""]["version"] == int(name[1])
    # mnasnet1_0, whose two versions are the same network, marked version 1: recorded as such
    sd = torch_model("mnasnet1_0").state_dict()
    sd._metadata[""]["version"] = 1
    read = sources.read_state_dict(save(sd, tmp_path / "m1.pth"))
    model = jaxpull_convert.from_state_dict("mnasnet1_0", read.tensors, torch_metadata=read.metadata)
    assert dict(model.spec.config) == {"version": 1}


def test_mnasnet_version_without_metadata_or_inside_a_wrapper(tmp_path):
    """A .safetensors file has no _metadata: the stem's width tells the version. Inside
    DataParallel the model's version is the metadata's ``module`` entry."""
    v1 = mnasnet_version_1("mnasnet0_5")
    out = tmp_path / "m.safetensors"
    path = save(v1.state_dict(), tmp_path / "v1.safetensors", "safetensors")
    jaxpull_convert.convert("mnasnet0_5", out, state_dict=path, image_size=32)
    assert dict(assert_same_logits(v1, out, 32).spec.config) == {"version": 1}
    wrapped = torch.nn.DataParallel(v1).state_dict()
    assert wrapped._metadata["module"]["version"] == 1 and wrapped._metadata[""]["version"] == 1
    wrapped._metadata[""]["version"] = 2  # DataParallel's own entry: not the model's
    meta = jaxpull_convert.convert("mnasnet0_5", out, state_dict=save(wrapped, tmp_path / "dp.pth"), image_size=32)
    assert "module." in meta["state_dict_note"]
    assert dict(assert_same_logits(v1, out, 32).spec.config) == {"version": 1}
    sd = v1.state_dict()
    sd._metadata[""]["version"] = 3
    os.remove(out)
    with pytest.raises(ValueError, match="records MNASNet version 3; torchvision's MNASNet has 1 and 2") as e:
        jaxpull_convert.convert("mnasnet0_5", out, state_dict=save(sd, tmp_path / "v3.pth"), image_size=32)
    assert "\n" not in str(e.value) and not out.exists()


# --------------------------------------------------------------------------------------
# Wrapper prefixes, a ViT at a size it cannot take, files that are not state_dicts
# --------------------------------------------------------------------------------------


def test_wrapper_prefixes_are_removed_and_reported(tmp_path):
    tm = torch_model("resnet18")
    wrapped = {
        "module.": torch.nn.DataParallel(tm),  # DistributedDataParallel keeps the model as .module too
        "_orig_mod.": torch.compile(tm),
        "_orig_mod.module.": torch.compile(torch.nn.DataParallel(tm)),
    }
    for prefix, wrapper in wrapped.items():
        sd = wrapper.state_dict()
        assert all(k.startswith(prefix) for k in sd)
        out = tmp_path / "m.safetensors"
        proc = run_in_process(
            "convert", "resnet18", "--state-dict", save(sd, tmp_path / "w.pth"), "-o", out, "--image-size", 32
        )
        assert proc.returncode == 0, proc.stderr
        assert f"note: removed the key prefix {prefix!r}" in proc.stdout, proc.stdout
        model = assert_same_logits(tm, out, 32) if prefix == "module." else jaxpull.load(out)
        assert model.metadata["state_dict_note"].startswith(f"removed the key prefix {prefix!r}")
        os.remove(out)
    # a prefix on some keys only is not a wrapper's: the keys are named as they are
    sd = OrderedDict(tm.state_dict())
    sd["module.fc.weight"] = sd.pop("fc.weight")
    proc = run_in_process("convert", "resnet18", "--state-dict", save(sd, tmp_path / "some.pth"), "-o", out)
    assert_one_line_error(proc, "missing fc.weight", "unexpected module.fc.weight")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["some.pth", "w.pth"]


@pytest.mark.large_models
def test_vit_at_an_input_size_it_cannot_take_is_one_line(tmp_path):
    """A 224 px ViT state_dict with --image-size 64: torchvision asserts the input size."""
    path = save(torch_model("vit_b_32", size=224).state_dict(), tmp_path / "vit.pth")
    out = tmp_path / "m.safetensors"
    proc = run_in_process("convert", "vit_b_32", "--state-dict", path, "-o", out, "--image-size", 64)
    assert_one_line_error(proc, "vit_b_32 cannot run on 64x64 images", "--image-size")
    assert "Traceback" not in proc.stderr and sorted(p.name for p in tmp_path.iterdir()) == ["vit.pth"]


def not_state_dicts(folder: Path) -> dict:
    """Files users give as state_dicts that are not: name -> (path, what the line must say it is)."""
    tm = torch_model("squeezenet1_1")
    model = "a whole pickled model (torchvision.models.squeezenet.SqueezeNet)"
    cases = {
        "whole model": ("whole.pth", model),
        "checkpoint holding a whole model": ("checkpoint.pth", model),
        "TorchScript": ("scripted.pt", "a TorchScript archive (torch.jit.save)"),
        "text": ("notes.pth", "a text file"),
        "empty": ("empty.pth", "an empty file"),
        "dict of other things": ("nested.pth", "a dict whose entries weights, epoch are not tensors"),
        "jaxpull model": ("converted.safetensors", "a model file jaxpull already converted: load it with jaxpull.load"),
    }
    torch.save(tm, folder / "whole.pth")
    torch.save({"model": tm, "epoch": 3}, folder / "checkpoint.pth")
    torch.jit.save(torch.jit.script(tm), folder / "scripted.pt")
    (folder / "notes.pth").write_text("layer weights: see the paper\n")
    (folder / "empty.pth").write_bytes(b"")
    torch.save({"weights": tm.state_dict(), "epoch": 3}, folder / "nested.pth")
    jaxpull.save(jaxpull_convert.from_torch_module("squeezenet1_1", tm), folder / "converted.safetensors")
    return {name: (folder / file, what) for name, (file, what) in cases.items()}


def test_files_that_are_not_state_dicts_say_what_they_are(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    cases = not_state_dicts(inputs)
    out = tmp_path / "x.safetensors"
    for name, (path, what) in cases.items():
        proc = run_in_process("convert", "squeezenet1_1", "--state-dict", path, "-o", out)
        assert_one_line_error(proc, f"cannot read state_dict {str(path)!r}: it is {what}")
        if name not in ("jaxpull model", "dict of other things"):
            assert "save the weights with torch.save(model.state_dict(), f)" in proc.stderr, name
        assert "weights_only" not in proc.stderr and "\x1b" not in proc.stderr, proc.stderr
        # jaxpull's restricted reader, the one used without torch, says the same
        with pytest.raises(ValueError, match="it is " + what.split(" (")[0]) as e:
            checkpoint.read(path, torch=None)
        assert "\n" not in str(e.value) and "\x1b" not in str(e.value)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["in"]


# --------------------------------------------------------------------------------------
# What a model file may record: image sizes within the converter's bounds, known options
# --------------------------------------------------------------------------------------


def rewritten(src: Path, dst: Path, **meta: str) -> Path:
    """``src``'s tensors with its metadata updated by ``meta``."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    with safe_open(str(src), framework="numpy") as f:
        old = f.metadata()
    save_file(load_file(str(src)), str(dst), metadata={**old, **meta})
    return dst


def test_image_size_bounds_are_one_definition():
    from jaxpull_convert import converter

    assert (converter.MIN_IMAGE_SIZE, converter.MAX_IMAGE_SIZE) == (32, 1024)
    assert converter.MAX_IMAGE_SIZE is preprocessing.MAX_IMAGE_SIZE
    assert converter.MIN_IMAGE_SIZE is preprocessing.MIN_IMAGE_SIZE
    for crop, resize in ((1025, 1025), (100000, 100000), (16, 64), (224, 1025)):
        with pytest.raises(ValueError, match=r"in \[32, 1024\]"):
            preprocessing.Preprocessing(crop, resize).check()


def test_recorded_builder_options_are_checked(tmp_path):
    """A small ViT's file with its config changed: an unknown option, wrong types, values out of
    range, and options the builder refuses are each one line, at load, in the API and the CLI."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    small = dict(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)
    good = tmp_path / "vit.safetensors"
    jaxpull.save(jaxpull_convert.from_torch_module("vit_b_16", VisionTransformer(**small, num_classes=10)), good)
    assert json.loads(jaxpull.load(good).metadata["config"]) == small
    bad_configs = {
        "unknown": ({"evil": 1}, "config option 'evil' is not one of vit_b_16's builder options (patch_size,"),
        "fraction": ({"num_heads": 2.5}, "config option num_heads is 2.5, not a whole number in [1, 256]"),
        "text": ({"image_size": "32"}, "config option image_size is '32', not a whole number in [32, 1024]"),
        "huge": ({"num_layers": 10**9}, "config option num_layers is 1000000000, not a whole number in [1, 256]"),
        "bool": ({"patch_size": True}, "config option patch_size is True"),
        "builder": ({"image_size": 36}, "image_size 36 is not a multiple of patch_size 8"),
        "not a mapping": ([1, 2], "is not a mapping of builder options"),
    }
    for name, (change, fragment) in bad_configs.items():
        config = {**small, **change} if isinstance(change, dict) else change
        bad = rewritten(good, tmp_path / f"{name.replace(' ', '_')}.safetensors", config=json.dumps(config))
        with pytest.raises(jaxpull.ModelFileError) as e:
            jaxpull.load(bad)
        assert "\n" not in str(e.value) and fragment in str(e.value) and bad.name in str(e.value), str(e.value)
    from PIL import Image

    Image.new("RGB", (40, 40)).save(tmp_path / "ok.png")
    proc = run_in_process("explain", tmp_path / "ok.png", "--model", tmp_path / "unknown.safetensors", "-o", "x.png")
    assert_one_line_error(proc, "config option 'evil'")
    mnasnet = tmp_path / "mnasnet.safetensors"
    jaxpull.save(jaxpull_convert.from_torch_module("mnasnet0_5", mnasnet_version_1("mnasnet0_5")), mnasnet)
    assert jaxpull.load(mnasnet).spec.config == (("version", 1),)
    for version in ("3", "true", "1.0"):  # JSON: only the whole numbers 1 and 2
        with pytest.raises(jaxpull.ModelFileError, match="config option version is .*, not one of 1, 2"):
            jaxpull.load(rewritten(mnasnet, tmp_path / "bad.safetensors", config=f'{{"version": {version}}}'))


# --------------------------------------------------------------------------------------
# One resolver: jaxpull.load takes what --model takes
# --------------------------------------------------------------------------------------


def test_jaxpull_load_takes_cached_names_like_the_command_line(offline_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXPULL_CACHE", str(offline_cache))
    before = sorted(os.listdir(offline_cache))
    model = jaxpull.load("mobilenet_v2")  # cached: no conversion, nothing printed
    assert model.arch == "mobilenet_v2" and model.class_names[967] == "espresso"
    assert jaxpull.load(offline_cache / "mobilenet_v2.safetensors").arch == "mobilenet_v2"  # a Path is a file
    with pytest.raises(jaxpull.ModelFileError, match=r"no converted resnet18 in .*: run `jaxpull convert resnet18"):
        jaxpull.load("resnet18")
    with pytest.raises(jaxpull.ModelFileError, match="'resnet77' is neither a .safetensors file nor"):
        jaxpull.load("resnet77")
    with pytest.raises(jaxpull.ModelFileError, match=r"not found: convert one"):
        jaxpull.load(str(tmp_path / "none.safetensors"))
    from PIL import Image

    Image.new("RGB", (40, 40)).save(tmp_path / "ok.png")
    proc = run_in_process("explain", tmp_path / "ok.png", "--model", "resnet18", "-o", tmp_path / "o.png")
    assert_one_line_error(proc, "no converted resnet18 in", "jaxpull convert resnet18")
    # an offline name whose package is missing: one line, no cache entry
    monkeypatch.setattr(offline, "locate", lambda src: None)
    with pytest.raises(ValueError, match="efficientnet_lite0 converts on first use from the package .* not installed"):
        jaxpull.load("efficientnet_lite0")
    assert sorted(os.listdir(offline_cache)) == before and not (tmp_path / "o.png").exists()
