"""Bad input and faults (issue 11): every entry point answers bad values with one line and
writes nothing; no silent wrong results; nothing is left behind.

Most cases call the library or ``jaxpull.shell.cli.main([...])`` in-process (a CLI subprocess costs
seconds of imports); the real ``jaxpull`` command runs in one grouped test.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
import subprocess
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import jaxpull
from conftest import torch_and_jax
from helpers import assert_one_line_error, run_in_process
from jaxpull.evaluation import explainers, metrics, pipeline
from jaxpull.files import images, outputs
from jaxpull.shell import sweep

# less codegen effort: each function runs once or twice, on small inputs (conftest.py)
pytestmark = pytest.mark.quick_compile

SIZE = 32  # small images keep every case fast


@pytest.fixture(scope="module")
def model():
    return torch_and_jax("resnet18", 10)[1]


@pytest.fixture(scope="module")
def model_file(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "r18.safetensors"
    jaxpull.save(model, path)
    return path


def good_images(n=2):
    return np.random.default_rng(0).uniform(-1, 1, (n, SIZE, SIZE, 3)).astype(np.float32)


def one_line_error(excinfo_or_text, *fragments):
    text = str(excinfo_or_text.value) if hasattr(excinfo_or_text, "value") else str(excinfo_or_text)
    assert "\n" not in text.strip() and text.strip(), repr(text)
    for f in fragments:
        assert f in text, text
    return text


def cli_error(argv, *fragments):
    """Run ``jaxpull ARGV`` in-process; assert exit status 2 and one ``jaxpull: error:`` line."""
    proc = run_in_process(*argv)
    assert_one_line_error(proc, *fragments)
    return proc.stderr.strip()


# --------------------------------------------------------------------------------------
# A fuzz table: every entry point x every kind of bad value -> one line, no output
# --------------------------------------------------------------------------------------


def bad_images():
    x = good_images()
    nan, inf, ninf, huge = x.copy(), x.copy(), x.copy(), x.copy()
    nan[0, 5, 7, 1] = np.nan  # one NaN pixel: jnp.max(jnp.abs(x)) skips it on XLA:CPU
    inf[1, 0, 0, 0] = np.inf
    ninf[0, 3, 3, 2] = -np.inf
    huge[0, 0, 0, 0] = -300.0  # negative and far out of [-1, 1] (0-255 pixels?)
    return {
        "nan": (nan, "NaN"),
        "inf": (inf, "infinite"),
        "-inf": (ninf, "infinite"),
        "negative out of range": (huge, "[-1, 1]"),
        "uint8 dtype": ((x * 127 + 128).astype(np.uint8), "floating point"),
        "wrong shape (no batch)": (x[0], "shape (N, H, W, 3)"),
        "channels first": (x.transpose(0, 3, 1, 2), "3 channels last"),
        "empty": (x[:0], "empty"),
    }


BAD_TARGETS = {
    "out of range": ([5000, 1], "out of range"),
    "negative": ([-1, 1], "out of range"),
    "just past the end": ([10, 1], "out of range"),
    "float dtype": ([1.5, 2.0], "integer"),
    "wrong shape": ([[1, 2, 3]], "shape"),
    "empty": ([], "shape"),
}


def _explain(model):
    return lambda xx, tt: explainers.gradient(model, xx, jnp.asarray(tt)[:, None])[:, 0]


def entry_points(model, tmp_path):
    """name -> f(x, targets (N,), attributions) for every public function that takes them."""
    key = jax.random.key(0)
    quadrants = np.array([[True, False, True, False]] * 2)

    def k_targets(t):
        t = np.asarray(t)
        return t[:, None] if t.ndim == 1 and t.size else t

    eps = {
        "model(x)": lambda x, t, a: model(x),
        "pullback": lambda x, t, a: jaxpull.pullback(model, x, k_targets(t)),
        "ascent": lambda x, t, a: jaxpull.ascent(model, x, k_targets(t), steps=1),
        "faithfulness_correlation": lambda x, t, a: metrics.faithfulness_correlation(
            model, x, np.asarray(t), a, grid=2
        ),
        "infidelity": lambda x, t, a: metrics.infidelity(model, x, np.asarray(t), a, key, samples=2),
        "random_logit": lambda x, t, a: metrics.random_logit(_explain(model), x, np.asarray(t), a, 10),
        "model_randomization": lambda x, t, a: metrics.model_randomization(
            lambda m, xx, tt: _explain(m)(xx, tt), model, x, np.asarray(t), a, key, 2
        ),
        "focus": lambda x, t, a: metrics.focus(a, x, quadrants),
        "max_sensitivity": lambda x, t, a: metrics.max_sensitivity(
            _explain(model), x, np.asarray(t), a, key, samples=1
        ),
        "evaluate": lambda x, t, a: pipeline.evaluate(
            model,
            x,
            list(np.asarray(t).ravel()),
            explainer_names=["gradient"],
            metric_names=["faithfulness"],
            progress=False,
        ),
        "sweep": lambda x, t, a: sweep.sweep(model, x, t, out=tmp_path / "runs" / "s", chunk_size=2, progress=False),
    }
    options = {
        "smoothgrad": dict(samples=2),
        "smoothgrad_pullback": dict(samples=2),
        "integrated_gradients": dict(steps=2),
        "pullback_ascent": dict(steps=1),
        "gradient_ascent": dict(steps=1),
    }
    for name, fn in explainers.EXPLAINERS.items():
        eps[f"explainers.{name}"] = (lambda f, o: lambda x, t, a: f(model, x, k_targets(t), **o))(
            fn, options.get(name, {})
        )
    return eps


TAKES_TARGETS = {
    "pullback",
    "ascent",
    "faithfulness_correlation",
    "infidelity",
    "random_logit",
    "model_randomization",
    "evaluate",
    "sweep",
}
TAKES_ATTRIBUTIONS = {
    "faithfulness_correlation",
    "infidelity",
    "random_logit",
    "model_randomization",
    "focus",
    "max_sensitivity",
}


def test_fuzz_every_entry_point_with_bad_values(model, tmp_path):
    """About 200 calls; each must raise a one-line ValueError naming the problem and write nothing."""
    x, t = good_images(), np.array([1, 2])
    a = np.asarray(explainers.gradient(model, x, t[:, None]))[:, 0]
    calls = entry_points(model, tmp_path)
    cases = []
    for name, fn in calls.items():
        for what, (bad_x, fragment) in bad_images().items():
            a_like = a if bad_x.shape == x.shape else np.zeros(bad_x.shape, np.float32)
            cases.append((f"{name} / images {what}", lambda fn=fn, bx=bad_x, al=a_like: fn(bx, t, al), fragment))
        if name in TAKES_TARGETS or name.startswith("explainers."):
            for what, (bad_t, fragment) in BAD_TARGETS.items():
                if name.startswith("explainers.") or name in ("pullback", "ascent", "sweep"):
                    if what == "wrong shape":  # (3, K) for 2 images; for a sweep's labels (2, 2)
                        bad_t, fragment = ([[1, 2], [3, 4]] if name == "sweep" else [[1, 2, 3]] * 3), "shape"
                    if what == "empty":
                        bad_t, fragment = (np.zeros(0, int) if name == "sweep" else np.zeros((2, 0), int)), "empty"
                cases.append((f"{name} / targets {what}", lambda fn=fn, bt=bad_t: fn(x, bt, a), fragment))
        if name in TAKES_ATTRIBUTIONS:
            nan_a, inf_a = a.copy(), a.copy()
            nan_a[0, 1, 1, 1] = np.nan
            inf_a[1, 2, 2, 0] = -np.inf
            for what, bad_a, fragment in [
                ("nan", nan_a, "NaN"),
                ("inf", inf_a, "infinite"),
                ("wrong shape", a[:, :16], "shape"),
                ("int dtype", a.astype(np.int32), "floating"),
            ]:
                cases.append((f"{name} / attributions {what}", lambda fn=fn, ba=bad_a: fn(x, t, ba), fragment))
    failures = []
    for label, call, fragment in cases:
        try:
            call()
        except ValueError as e:
            text = str(e)
            if "\n" in text or fragment not in text:
                failures.append(f"{label}: {text!r} (wanted {fragment!r})")
        else:
            failures.append(f"{label}: no error")
    assert not failures, "\n".join(failures)
    assert len(cases) > 150
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*"))  # no sweep output anywhere


def test_out_of_range_class_indices_are_refused_not_clamped(model):
    # JAX clamps gathers: these used to return class 9's value for 5000 and for -1
    x = good_images(1)
    a = np.ones_like(x)
    for bad in (5000, 10, -1):
        with pytest.raises(ValueError) as e:
            metrics.faithfulness_correlation(model, x, jnp.array([bad]), a, grid=2)
        one_line_error(e, f"label {bad} is out of range", "[0, 10)")
        with pytest.raises(ValueError) as e:
            metrics.infidelity(model, x, jnp.array([bad]), a, jax.random.key(0), samples=2)
        one_line_error(e, f"label {bad} is out of range")
    with pytest.raises(ValueError) as e:
        metrics.random_logit(_explain(model), x, np.array([3]), a, 1)
    one_line_error(e, "num_classes must be a whole number >= 2")
    with pytest.raises(ValueError) as e:
        pipeline.evaluate(model, x, [1.7], explainer_names=["gradient"], metric_names=["faithfulness"], progress=False)
    one_line_error(e, "integer")  # was silently truncated to label 1
    with pytest.raises(ValueError) as e:
        model.label(True)
    one_line_error(e, "not a bool")
    # in range still works and agrees with the hand-picked class
    r = metrics.faithfulness_correlation(
        model, x, jnp.array([9]), np.random.default_rng(0).normal(size=x.shape), grid=2
    )
    assert r.shape == (1,) and np.isfinite(np.asarray(r)).all()


# --------------------------------------------------------------------------------------
# Images: deep greyscale modes, decompression bombs, huge and extreme-aspect images
# --------------------------------------------------------------------------------------


def _grey(w=300, h=200):
    """A smooth 16-bit greyscale picture (0-65535) and its 8-bit equivalent (0-255)."""
    yy, xx = np.mgrid[0:h, 0:w]
    v16 = ((xx / w * 0.7 + yy / h * 0.3) * 65535).astype(np.uint16)
    return v16, np.round(v16 / 257).astype(np.uint8)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I", "F"])
def test_deep_greyscale_modes_agree_with_their_8_bit_copy(mode, tmp_path):
    v16, v8 = _grey()
    h, w = v16.shape
    if mode == "I;16B":
        img = Image.frombytes("I;16B", (w, h), v16.astype(">u2").tobytes())
    elif mode == "I;16L":
        img = Image.frombytes("I;16L", (w, h), v16.astype("<u2").tobytes())
    elif mode == "I":
        img = Image.fromarray(v16.astype(np.int32), "I")
    elif mode == "F":
        img = Image.fromarray((v16 / 65535).astype(np.float32), "F")
    else:
        img = Image.fromarray(v16)  # uint16 -> I;16
    assert img.mode == mode
    reference = images.preprocess(Image.fromarray(v8, "L"))
    got = images.preprocess(img)
    assert np.abs(got - reference).max() <= 2 / 255 + 1e-6  # within one 8-bit level ([-1, 1] is 2/255 a level)
    assert got.mean() < 0.5  # was all white (+1) before
    path = tmp_path / "deep.tiff"
    img.save(path)
    assert np.abs(images.load_image(path) - reference).max() <= 2 / 255 + 1e-6
    if mode == "I;16":  # PIL opens 16-bit PNGs as I;16 too
        img.save(tmp_path / "deep.png")
        assert np.abs(images.load_image(tmp_path / "deep.png") - reference).max() <= 2 / 255 + 1e-6


def test_deep_modes_out_of_their_range_are_refused(tmp_path):
    for img, fragment in [
        (Image.fromarray(np.full((8, 8), 3.0, np.float32), "F"), "mode F samples must be in [0, 1]"),
        (Image.fromarray(np.full((8, 8), -5, np.int32), "I"), "mode I samples must be in [0, 65535]"),
        (Image.fromarray(np.full((8, 8), np.nan, np.float32), "F"), "mode F"),
    ]:
        path = tmp_path / "x.tiff"
        img.save(path)
        with pytest.raises(ValueError) as e:
            images.load_image(path)
        one_line_error(e, "cannot read image", fragment, "8-bit")


def test_decompression_bomb_is_refused_in_one_line_and_large_images_quietly(model_file, tmp_path, monkeypatch):
    Image.new("1", (400, 400)).save(tmp_path / "bomb.png")  # 160,000 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 60_000)  # PIL warns above this, refuses above 2 x 60,000
    with pytest.raises(ValueError) as e:
        images.load_image(tmp_path / "bomb.png")
    one_line_error(e, "bomb.png", "more than 120,000 pixels", "smaller image")
    cli_error(
        ["explain", tmp_path / "bomb.png", "--model", model_file, "-o", tmp_path / "o.png"],
        "more than 120,000 pixels",
    )
    assert not (tmp_path / "o.png").exists()
    Image.new("RGB", (300, 250)).save(tmp_path / "large.png")  # 75,000: above the warning limit, below the bomb
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning would fail here
        assert images.load_image(tmp_path / "large.png").shape == (224, 224, 3)


def test_a_real_20000x20000_png_is_refused_before_decoding(tmp_path):
    path = tmp_path / "huge.png"
    Image.new("1", (20000, 20000)).save(path)  # a few KB on disk, 400 million pixels
    assert path.stat().st_size < 200_000
    start = time.perf_counter()
    with pytest.raises(ValueError) as e:
        images.load_image(path)
    one_line_error(e, "huge.png", "pixels", "smaller image")
    assert time.perf_counter() - start < 2


def test_huge_jpeg_is_decoded_at_reduced_scale(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "LARGE_SIDE", 1000)  # the same path as a 12000x12000 photo, cheaply
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (12, 18, 3), dtype=np.uint8)
    big = Image.fromarray(small).resize((3600, 2400), Image.BILINEAR)
    big.save(tmp_path / "big.jpg", quality=95)
    with images.open_image(tmp_path / "big.jpg") as im:
        assert im.size == (900, 600)  # DCT-scaled by 4; the short side stays >= 2 * 256
    with Image.open(tmp_path / "big.jpg") as full:
        expected = images.preprocess(full)
    assert np.abs(images.load_image(tmp_path / "big.jpg") - expected).mean() < 0.01


@pytest.mark.parametrize("size", [(12000, 1), (1, 30000), (40000, 150)])
def test_extreme_aspect_ratios_are_bounded(size, tmp_path):
    path = tmp_path / "strip.png"
    Image.new("RGB", size, (200, 100, 50)).save(path)
    start = time.perf_counter()
    x = images.load_image(path)  # used 3.3 GB (12000x1) or raised MemoryError (1x30000)
    assert time.perf_counter() - start < 2
    assert x.shape == (224, 224, 3)
    np.testing.assert_allclose(images.to_pixels(x)[100, 100], (200, 100, 50), atol=1)


def test_crop_first_resize_matches_resize_then_crop():
    # aspect 300:1 takes the crop-first path; the full resize is still affordable here to compare
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (2, 600, 3), dtype=np.uint8))
    w, h = img.size
    nw, nh = int(256 * w / h), 256
    assert nw * nh > images.MAX_INTERMEDIATE
    left = int(round((nw - 224) / 2.0))
    expected = np.asarray(img.resize((nw, nh), Image.BILINEAR).crop((left, 16, left + 224, 240)))
    got = images.to_pixels(images.preprocess(img))
    assert np.abs(got.astype(int) - expected).max() <= 1


def test_memory_error_is_one_line_at_the_cli_edge(model_file, tmp_path, monkeypatch):
    def exhausted(*a, **k):
        raise MemoryError()

    monkeypatch.setattr(images, "load_images", exhausted)
    cli_error(["explain", "a.png", "--model", model_file, "-o", tmp_path / "o.png"], "out of memory")
    assert not (tmp_path / "o.png").exists()


# --------------------------------------------------------------------------------------
# Model files that cannot give meaningful output
# --------------------------------------------------------------------------------------


def _rewrite(src, dst, tensors=None, meta=None):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(src), framework="numpy") as f:
        metadata = dict(f.metadata())
        flat = {k: f.get_tensor(k) for k in f.keys()}
    if tensors:
        flat = tensors(flat)
    metadata.update(meta or {})
    save_file(flat, str(dst), metadata=metadata)


def _set(key, fn):
    def change(flat):
        flat = dict(flat)
        flat[key] = fn(flat[key])
        return flat

    return change


def _nan(a):
    a = a.copy()
    a.flat[3] = np.nan
    return a


def _inf(a):
    a = a.copy()
    a.flat[0] = np.inf
    return a


MODEL_FILES = {
    "int8 tensor": (dict(tensors=_set("fc/kernel", lambda a: a.astype(np.int8))), "fc/kernel has dtype int8"),
    "NaN tensor": (dict(tensors=_set("fc/bias", _nan)), "fc/bias holds NaN or infinite values"),
    "inf tensor": (dict(tensors=_set("conv1/kernel", _inf)), "conv1/kernel holds NaN or infinite values"),
    "input_std zeros": (dict(meta={"input_std": "[0, 0, 0]"}), "input_std '[0, 0, 0]' must be positive"),
    "input_std negative": (dict(meta={"input_std": "[0.2, -0.2, 0.2]"}), "must be positive"),
    "input_std NaN": (dict(meta={"input_std": "[NaN, 0.2, 0.2]"}), "not three finite numbers"),
    "input_mean two numbers": (dict(meta={"input_mean": "[0.4, 0.4]"}), "input_mean '[0.4, 0.4]' is not three finite"),
    "input_std text": (dict(meta={"input_std": '"abc"'}), "not three finite numbers"),
    "num_classes negative": (dict(meta={"num_classes": "-3"}), "num_classes '-3' is not a whole number >= 1"),
    "num_classes zero": (dict(meta={"num_classes": "0"}), "num_classes '0'"),
    "num_classes fraction": (dict(meta={"num_classes": "2.5"}), "num_classes '2.5'"),
    "num_classes text": (dict(meta={"num_classes": "ten"}), "num_classes 'ten'"),
    "class_names count": (
        dict(meta={"class_names": json.dumps(["a", "b"])}),
        "class_names has 2 names for num_classes 10",
    ),
    "class_names not strings": (dict(meta={"class_names": json.dumps(list(range(10)))}), "not a list of strings"),
    "class_names not JSON": (dict(meta={"class_names": "[a, b"}), "invalid metadata"),
    "unknown arch": (dict(meta={"arch": "resnet99"}), "unknown architecture 'resnet99'"),
    "num_classes disagrees with tensors": (dict(meta={"num_classes": "7"}), "does not match architecture resnet18"),
    "config unknown option": (
        dict(meta={"config": '{"evil": 1}'}),
        "config option 'evil' is not one of resnet18's builder options (block, stage_sizes, deep_stem",
    ),
    "crop_size 100000": (  # explain would resize to 100000 px (24 GB): the converter's bounds
        dict(meta={"crop_size": "100000", "resize_size": "100000"}),
        "crop_size must be a whole number of pixels in [32, 1024], got 100000",
    ),
}


def test_model_files_that_cannot_give_meaningful_output_are_refused(model_file, tmp_path):
    jaxpull.load(model_file)  # the good file loads
    for name, (change, fragment) in MODEL_FILES.items():
        bad = tmp_path / f"{name.replace(' ', '_')}.safetensors"
        _rewrite(model_file, bad, **change)
        with pytest.raises(jaxpull.ModelFileError) as e:
            jaxpull.load(bad)
        one_line_error(e, str(bad.name), fragment)
    # the same message at the CLI (in-process), before any compute
    Image.new("RGB", (40, 40)).save(tmp_path / "ok.png")
    cli_error(
        ["explain", tmp_path / "ok.png", "--model", tmp_path / "NaN_tensor.safetensors", "-o", tmp_path / "o.png"],
        "holds NaN or infinite values",
    )
    assert not (tmp_path / "o.png").exists()


# --------------------------------------------------------------------------------------
# Raw exception texts: one line each
# --------------------------------------------------------------------------------------


def test_directories_where_files_belong(model_file, tmp_path):
    (tmp_path / "d.png").mkdir()
    (tmp_path / "m.safetensors").mkdir()
    with pytest.raises(ValueError) as e:
        jaxpull.load(tmp_path / "m.safetensors")
    one_line_error(e, "is a directory")
    with pytest.raises(OSError) as e:
        images.load_image(tmp_path / "d.png")
    one_line_error(e, "is a directory")
    Image.new("RGB", (40, 40)).save(tmp_path / "ok.png")
    cli_error(["explain", tmp_path / "d.png", "--model", model_file, "-o", tmp_path / "o.png"], "is a directory")
    cli_error(
        ["explain", tmp_path / "ok.png", "--model", model_file, "-o", tmp_path / "d.png"],
        "output",
        "is a directory",
    )  # -o names a directory: refused before any compute
    cli_error(
        ["explain", tmp_path / "ok.png", "--model", model_file, "-o", tmp_path / "ok.png" / "x.png"],
        "is a file, not a directory",
    )
    cli_error(
        [
            "explain",
            tmp_path / "ok.png",
            "--model",
            model_file,
            "-o",
            tmp_path / "o.png",
            "--save-arrays",
            tmp_path / "d.png",
        ],
        ".npz",
    )


def test_cli_settings_messages_use_the_cli_spelling(model_file, tmp_path):
    Image.new("RGB", (40, 40)).save(tmp_path / "ok.png")
    err = cli_error(
        ["explain", tmp_path / "ok.png", "--model", model_file, "-o", tmp_path / "o.png", "--temperature", "0"],
        "--temperature must be a positive number",
        "--relu plain",
    )
    assert "relu='plain'" not in err
    cli_error(
        ["sweep", tmp_path / "ok.png", "--model", model_file, "--out", tmp_path / "s", "--temperatures", "0.3,abc"],
        "'abc' is not a number",
    )
    cli_error(
        ["sweep", tmp_path / "ok.png", "--model", model_file, "--out", tmp_path / "s", "--temperatures", "-1"],
        "--temperatures",
        "write none",
    )
    cli_error(["demo", "--seed", "-1", "-o", tmp_path / "demo.png"], "--seed must be a non-negative integer")
    cli_error(["evaluate", "--images", "samples", "--seed", "-1", "-o", tmp_path / "e.md"], "--seed")
    assert sorted(os.listdir(tmp_path)) == ["ok.png"]


def test_convert_bad_image_size_and_unwritable_output(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    import torchvision

    sd = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), sd)
    out = tmp_path / "x.safetensors"
    for size in ("0", "-5", "5000"):
        cli_error(
            ["convert", "resnet18", "--state-dict", sd, "-o", out, "--image-size", size],
            f"image size {size} is out of range",
            "[32, 1024]",
        )
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    access = os.access
    if access(locked, os.W_OK):  # root ignores directory permissions: make os.access say what a user would see
        monkeypatch.setattr(
            os, "access", lambda p, mode: access(p, mode) and not (str(p) == str(locked) and mode & os.W_OK)
        )
    start = time.perf_counter()
    cli_error(["convert", "resnet18", "--state-dict", sd, "-o", locked / "x.safetensors"], "not writable")
    assert time.perf_counter() - start < 1  # before reading the state_dict or any compute
    monkeypatch.undo()
    locked.chmod(0o700)
    (tmp_path / "d.safetensors").mkdir()
    cli_error(["convert", "resnet18", "--state-dict", sd, "-o", tmp_path / "d.safetensors"], "is a directory")
    assert not out.exists()


# --------------------------------------------------------------------------------------
# Files: atomic writes, stale temporaries, permissions
# --------------------------------------------------------------------------------------


def test_stale_temp_files_of_killed_writes_are_removed_and_permissions_normal(tmp_path):
    target = tmp_path / "a.npz"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process that has exited
    orphan = tmp_path / f".a.npz.{dead_pid}-x1y2z3w4.part"  # what kill -9 during a write leaves
    legacy = tmp_path / ".a.npz.k3j4abcd.part"  # the naming before pids were recorded
    live = tmp_path / f".a.npz.{os.getpid()}-busy_now.part"  # a write in progress (this process)
    other = tmp_path / f".b.npz.{dead_pid}-zzzzzzzz.part"  # another target's: not ours to remove
    backup = tmp_path / f".a.npz.bak.{dead_pid}-abcdefgh.part"  # a.npz.bak's, though it starts like a.npz's
    for f in (orphan, legacy, live, other, backup):
        f.write_bytes(b"partial")
        f.chmod(0o600)
    outputs.save_arrays(target, {"a": np.arange(3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a.npz", live.name, other.name, backup.name])
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    np.testing.assert_array_equal(np.load(target)["a"], np.arange(3))


def test_kill_9_during_a_write_leaves_a_temp_that_the_next_write_removes(tmp_path):
    code = (
        "import os, signal, sys; from jaxpull.files import outputs\n"
        "def write(tmp):\n"
        "    open(tmp, 'wb').write(b'x' * 1000)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        f"outputs.atomic_write({str(tmp_path / 'm.json')!r}, write)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == -9
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".m.json.") and left[0].endswith(".part")
    outputs.atomic_write(tmp_path / "m.json", lambda tmp: open(tmp, "w").write("{}"))
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


# --------------------------------------------------------------------------------------
# Sweeps: lock, parents, corrupt manifest, top_labels
# --------------------------------------------------------------------------------------


def test_sweep_output_lock_parents_manifest_and_top_labels(model, tmp_path):
    x = good_images(1)
    out = tmp_path / "runs" / "all_labels"  # 'runs' does not exist: created (the README's example)
    r = sweep.sweep(model, x, [1, 4, 7], reduce="alignment", out=out, chunk_size=2, progress=False)
    saved = np.load(out / "top_labels.npy")
    np.testing.assert_array_equal(saved, r["top_labels"])
    assert saved.shape == (1, 1, 3) and sorted(saved[0, 0]) == [1, 4, 7]
    # a second sweep into the same directory while one holds it: refused in one line
    with open(out / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RuntimeError) as e:
            sweep.sweep(model, x, [1, 4, 7], reduce="alignment", out=out, chunk_size=2, progress=False)
        one_line_error(e, "another sweep is writing to", "all_labels")
    # resuming (nothing left to do) gives the same top labels, loaded from the directory
    again = sweep.sweep(model, x, [1, 4, 7], reduce="alignment", out=out, chunk_size=2, progress=False)
    np.testing.assert_array_equal(again["top_labels"], saved)
    # a corrupt manifest: one line, no JSONDecodeError text
    (out / "manifest.json").write_text('{"fingerprint": "abc", "done": [0,')
    with pytest.raises(ValueError) as e:
        sweep.sweep(model, x, [1, 4, 7], reduce="alignment", out=out, chunk_size=2, progress=False)
    one_line_error(e, "manifest.json", "is corrupt", "delete the directory")
    # a sweep that fails validation leaves no directory behind
    with pytest.raises(ValueError):
        sweep.sweep(model, x, [99], out=tmp_path / "fresh" / "s", progress=False)
    assert not (tmp_path / "fresh" / "s").exists()
    # an output path that is a file
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError) as e:
        sweep.sweep(model, x, [1], out=tmp_path / "file", progress=False)
    one_line_error(e, "is a file")


def test_two_sweep_processes_do_not_both_compute(model, tmp_path):
    """A second process is refused while the first holds the directory (the real command)."""
    out = tmp_path / "s"
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
            "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
            str(out / ".lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RuntimeError) as e:
            sweep.sweep(model, good_images(1), [1, 2], out=out, chunk_size=2, progress=False)
        one_line_error(e, "another sweep is writing to")
    finally:
        holder.kill()
        holder.wait()
    r = sweep.sweep(model, good_images(1), [1, 2], out=out, chunk_size=2, progress=False)  # free again
    assert r["maps"].shape == (1, 1, 2, SIZE, SIZE, 3)


# --------------------------------------------------------------------------------------
# The app: uploads validated by jaxpull, per-request files bounded and removed
# --------------------------------------------------------------------------------------


def test_app_uploads_are_opened_by_jaxpull(tmp_path, monkeypatch):
    from jaxpull.shell import explorer as ex

    cases = {
        "notes.png": (b"these are notes, not pixels", "not an image this app can read"),
        "empty.jpg": (b"", "not an image this app can read"),
        "page.pdf": (b"%PDF-1.4 ...", "not an image this app can read"),
    }
    for name, (data, fragment) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError) as e:
            ex.read_upload(str(tmp_path / name))
        text = one_line_error(e, fragment)
        assert str(tmp_path) not in text  # no server paths in the page
    with pytest.raises(ValueError) as e:
        ex.read_upload(str(tmp_path / "gone.png"))
    one_line_error(e, "upload the image again")
    Image.fromarray(np.full((8, 8), 9.0, np.float32), "F").save(tmp_path / "f.tiff")
    with pytest.raises(ValueError) as e:
        ex.read_upload(str(tmp_path / "f.tiff"))
    one_line_error(e, "the upload cannot be used", "mode F samples must be in [0, 1]")
    Image.new("1", (400, 400)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 60_000)
    with pytest.raises(ValueError) as e:
        ex.read_upload(str(tmp_path / "bomb.png"))
    one_line_error(e, "too large to decode safely")
    v16, v8 = _grey()
    Image.fromarray(v16).save(tmp_path / "deep.png")  # a 16-bit upload is no longer white
    x, note = ex.read_upload(str(tmp_path / "deep.png"))
    assert np.abs(x - images.preprocess(Image.fromarray(v8, "L"))).max() <= 2 / 255 + 1e-6 and note == ""


def test_app_output_files_are_bounded_and_removed(tmp_path, monkeypatch):
    from jaxpull.shell import explorer as ex

    monkeypatch.setattr(ex, "available_models", lambda d: {ex.DEFAULT_LABEL: "efficientnet_lite0"})
    monkeypatch.setattr(ex.tempfile, "tempdir", str(tmp_path))  # where mkdtemp puts jaxpull-app-*
    e = ex.Explorer()
    assert list(tmp_path.iterdir()) == []  # nothing made before the first request (a failed start leaves nothing)
    for i in range(ex.KEEP_ARRAYS + 5):
        e._save_arrays(e.output_dir / f"jaxpull_1_{i:03d}.npz", {"a": np.arange(3)})
        os.utime(e.output_dir / f"jaxpull_1_{i:03d}.npz", ns=(i * 10**9, i * 10**9))
    kept = sorted(p.name for p in e.output_dir.iterdir())
    assert len(kept) == ex.KEEP_ARRAYS and kept[0] == "jaxpull_1_005.npz"
    folder = e.output_dir
    assert folder.parent == tmp_path and folder.name.startswith("jaxpull-app-")
    e.close()
    assert not folder.exists() and list(tmp_path.iterdir()) == []
    given = tmp_path / "mine"
    given.mkdir()
    e = ex.Explorer(output_dir=str(given))
    e._save_arrays(given / "jaxpull_2_0.npz", {"a": np.arange(2)})
    e.close()
    assert given.is_dir() and [p.name for p in given.iterdir()] == ["jaxpull_2_0.npz"]  # a given folder stays
