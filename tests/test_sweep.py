"""Sweeps: chunking within a memory budget, streaming to disk, resuming (with another chunk or
device count), sharding, the memory bound, and refusing results built from NaN."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxpull
from conftest import images, torch_and_jax
from helpers import assert_one_line_error, run_in_process
from jaxpull.core import sweep as core
from jaxpull.core.sweep import Span
from jaxpull.files import images as image_files
from jaxpull.shell import sweep as S
from sweep_helpers import JAXPULL, assert_error_after_progress, env, photo, small_model_file


@pytest.fixture(scope="module")
def model():
    return torch_and_jax("resnet18", 10)[1]


X = images(2, 48, seed=11)


def test_sweep_equals_direct_calls_in_any_chunking(model):
    ts = [0.3, None, 2.0]
    full = S.sweep(model, X, range(10), ts, chunk_size=4, progress=False)["maps"]
    assert full.shape == (2, 3, 10, 48, 48, 3)
    for k, t in enumerate(ts):
        np.testing.assert_allclose(
            full[:, k],
            jaxpull.pullback(model, X, np.arange(10), **(dict(rules="vanilla") if t is None else dict(temperature=t))),
            rtol=1e-5,
            atol=1e-7,
        )
    norms = S.sweep(model, X, range(10), ts, reduce="norms", chunk_size=3, progress=False)["norms"]
    np.testing.assert_allclose(norms, np.linalg.norm(full.reshape(2, 3, 10, -1), axis=-1), rtol=1e-5)


def test_ascent_sweep_and_alignment(model):
    r = S.sweep(
        model, X[:1], [1, 4, 7], [0.3], method="ascent", reduce="alignment", chunk_size=2, steps=2, progress=False
    )
    diffs = np.asarray(jaxpull.ascent(model, X[:1], [1, 4, 7], steps=2, output="diff"))[0]
    expected = [np.sum(d * X[0]) / np.linalg.norm(d) / np.linalg.norm(X[0]) for d in diffs]
    np.testing.assert_allclose(r["alignment"][0, 0], expected, rtol=1e-4)
    assert list(r["top_labels"][0, 0]) == list(np.array([1, 4, 7])[np.argsort(-np.array(expected))])


def test_memory_budget_sets_the_chunk_and_bad_budgets_are_errors(model):
    small = S.plan(model, (48, 48, 3), memory_budget=200e6)
    large = S.plan(model, (48, 48, 3), memory_budget=2e9)
    assert 1 <= small.chunk < large.chunk and small.unit_bytes <= 200e6
    with pytest.raises(ValueError, match="too small for one label"):
        S.sweep(model, X, range(10), memory_budget=1e6, progress=False)
    for bad in (float("nan"), float("inf"), -1, 0, "2GB"):
        with pytest.raises(ValueError, match="memory budget must be"):
            S.sweep(model, X, range(10), memory_budget=bad, progress=False)


def test_memory_budget_flag_nan_and_inf_are_one_line_errors(tmp_path):
    for bad in ("nan", "inf", "-1GB", "0"):
        proc = run_in_process("sweep", "x.png", f"--memory-budget={bad}", "--out", tmp_path / "s")
        assert_one_line_error(proc, "--memory-budget must be a finite positive size such as 2GB", repr(bad))
    assert not (tmp_path / "s").exists()


def test_planner_bound_comes_from_the_residuals_and_is_cheap(model):
    """The bound reads the shapes of jax.vjp's residuals (jax.eval_shape, no compile)."""
    start = time.perf_counter()
    p = S.plan(model, (224, 224, 3), "pullback", "alignment", memory_budget=2 * 2**30, num_labels=1000)
    seconds = time.perf_counter() - start
    largest = 112 * 112 * 64 * 4  # resnet18's first convolution output, float32: the widest residual
    assert p.per_label_bytes == core.COTANGENT_COPIES * largest and p.unit_bytes <= 2 * 2**30
    assert p.chunk == 1000 // p.devices * p.devices or p.chunk >= 100
    a = S.plan(model, (224, 224, 3), "ascent", "alignment", memory_budget=2 * 2**30, num_labels=1000)
    per_image = a.per_label_bytes - core.COTANGENT_COPIES * largest
    assert 20 * largest > per_image > 5 * largest  # every layer's residuals, a few MB each
    assert 1 <= a.chunk < p.chunk and a.unit_bytes <= 2 * 2**30
    assert seconds < 10


def test_results_stream_to_disk_and_resume(model, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    calls, interrupt = [], [True]
    real_unit = S.unit

    def counting_unit(*a, **k):
        calls.append(1)
        if interrupt[0] and len(calls) == 3:
            raise RuntimeError("simulated interruption")  # mid-sweep
        return real_unit(*a, **k)

    monkeypatch.setattr(S, "unit", counting_unit)
    with pytest.raises(RuntimeError, match="simulated"):
        S.sweep(model, X, range(10), [0.3], out=out, chunk_size=4, progress=False)
    manifest = json.loads((out / "manifest.p0-of-1.json").read_text())
    assert manifest["done"] == ["i0.t0.l0-4.npy", "i0.t0.l4-8.npy"]  # two units finished and recorded
    assert sorted(p.name for p in (out / "units").iterdir()) == manifest["done"]
    calls.clear()
    interrupt[0] = False
    r = S.sweep(model, X, range(10), [0.3], out=out, chunk_size=4, progress=False)
    assert len(calls) == 4  # 6 units in all, 2 already written
    assert isinstance(r["maps"], np.memmap)
    assert sorted(p.name for p in out.iterdir()) == [".lock", "manifest.json", "maps.npy"]  # units merged
    loaded = np.load(out / "maps.npy", mmap_mode="r")
    np.testing.assert_allclose(loaded[:, 0], jaxpull.pullback(model, X, np.arange(10)), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(S.read(out)["maps"], loaded)


def test_bad_input_before_compute(model, tmp_path):
    out = tmp_path / "s"
    S.sweep(model, X[:1], [1, 2], [0.3], out=out, chunk_size=2, progress=False)
    with pytest.raises(ValueError, match="holds a different sweep"):
        S.sweep(model, X[:1], [1, 3], [0.3], out=out, chunk_size=2, progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        S.sweep(model, X[:1], [1], out=tmp_path / "full", progress=False)
    with pytest.raises(ValueError, match="out of range"):
        S.sweep(model, X[:1], [1, 10], progress=False)
    with pytest.raises(ValueError, match="temperature must be a positive number"):
        S.sweep(model, X[:1], [1], [0.3, -1.0], progress=False)
    with pytest.raises(ValueError, match="unknown reduce"):
        S.sweep(model, X[:1], [1], reduce="mean", progress=False)
    with pytest.raises(ValueError, match="unknown setting"):
        S.sweep(model, X[:1], [1], method="ascent", stepz=3, progress=False)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size must be a whole number >= 1"):
            S.sweep(model, X[:1], [1], chunk_size=bad, progress=False)
    (out / "manifest.json").write_text(
        json.dumps({"fingerprint": "abc", "done": [0], "chunk": 2})
    )  # jaxpull's old format
    with pytest.raises(ValueError, match="written by an older jaxpull"):
        S.sweep(model, X[:1], [1, 2], [0.3], out=out, chunk_size=2, progress=False)


def test_units_are_spans_of_labels_whatever_the_chunk():
    units = core.chunks(2, 1, 10, 4)
    assert units[:3] == [Span(0, 0, 0, 4), Span(0, 0, 4, 8), Span(0, 0, 8, 10)] and len(units) == 6
    shares = [core.share(units, i, 4) for i in range(4)]
    assert sum(shares, []) == units and [len(s) for s in shares] == [1, 2, 1, 2]
    done = [Span(0, 0, 0, 5), Span(0, 0, 6, 7), Span(1, 0, 0, 10)]  # finished with chunks 5 and 1
    assert core.missing(Span(0, 0, 4, 8), done) == [Span(0, 0, 5, 6), Span(0, 0, 7, 8)]
    assert core.gaps(2, 1, 10, done) == [Span(0, 0, 5, 6), Span(0, 0, 7, 10)]
    assert core.gaps(2, 1, 10, done + [Span(0, 0, 4, 10)]) == []
    np.testing.assert_array_equal(core.padded_labels(np.arange(10) * 3, Span(0, 0, 8, 10), 3), [[24, 27, 24]])
    assert core.chunk_for_size(300, 1, 10) == 10 and core.chunk_for_size(5, 3, 100) == 6


def test_chunk_size_is_capped_by_the_labels(model, monkeypatch):
    widths, real_unit = [], S.unit
    monkeypatch.setattr(S, "unit", lambda *a, **k: widths.append(a[2].shape) or real_unit(*a, **k))
    r = S.sweep(model, X[:1], range(10), reduce="norms", chunk_size=300, progress=False)
    assert widths == [(1, 10)] and r["norms"].shape == (1, 1, 10)  # not 300 labels, 290 of them padding


def test_out_of_memory_pins_no_chunk(model, tmp_path, monkeypatch):
    """A unit that runs out of memory: one line with the advice; the next run may use a smaller chunk
    and keeps the finished units."""
    out, widths, real_unit = tmp_path / "s", [], S.unit

    def unit(*a, **k):
        widths.append(a[2].shape[1])
        if len(widths) == 2 and widths[-1] == 4:
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1 bytes.")
        return real_unit(*a, **k)

    monkeypatch.setattr(S, "unit", unit)
    with pytest.raises(ValueError) as e:
        S.sweep(model, X[:1], range(10), reduce="norms", out=out, chunk_size=4, progress=False)
    text = str(e.value)
    assert "\n" not in text and "out of memory computing a unit of 4 labels: use a smaller --chunk-size" in text
    widths.clear()
    r = S.sweep(model, X[:1], range(10), reduce="norms", out=out, chunk_size=3, progress=False)
    assert widths == [3, 3, 3]  # labels 4-5, 6-8 and 9, padded to 3: the failed run's chunk is not pinned
    whole = S.sweep(model, X[:1], range(10), reduce="norms", chunk_size=3, progress=False)["norms"]  # in memory
    np.testing.assert_allclose(r["norms"], whole, rtol=1e-5)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    return small_model_file(d), photo(d)


def test_resume_on_another_device_count_computes_every_label(files, tmp_path, monkeypatch):
    """Issue 33's case: ``--labels 0-99 --method ascent --reduce norms --chunk-size 5`` stopped after 7
    units, resumed with 3 CPU devices (the chunk becomes 6): every label computed, as in one run."""
    model_file, image = files
    out = tmp_path / "D"
    argv = ["sweep", image, "--model", model_file, "--labels", "0-99", "--method", "ascent"]
    argv += ["--reduce", "norms", "--chunk-size", "5", "--out", out]
    calls, real_unit = [], S.unit

    def stopped_after_7(*a, **k):
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt  # as a kill after 7 units
        return real_unit(*a, **k)

    monkeypatch.setattr(S, "unit", stopped_after_7)
    assert run_in_process(*argv).returncode == 130
    assert len(list((out / "units").iterdir())) == 7
    resumed = subprocess.run(
        JAXPULL + [str(a) for a in argv],
        env=env(XLA_FLAGS="--xla_force_host_platform_device_count=3"),
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "12 units of 6 labels, 5 done before" in resumed.stderr  # labels 35-99; 0-34 kept
    norms = np.load(out / "norms.npy")[0, 0]
    model = jaxpull.load(model_file)
    x = image_files.load_images([image], **model.preprocessing.image_options)
    whole = S.sweep(model, x, range(100), method="ascent", reduce="norms", chunk_size=5, progress=False)["norms"]
    assert (norms > 0).all()  # labels 35-41 were left at 0.0 when units were numbered by the chunk
    np.testing.assert_allclose(norms, whole[0, 0], rtol=1e-4)


def test_results_that_are_not_finite_are_refused(files, tmp_path):
    """An ascent whose relative steps overflow float32: no "most aligned labels" from NaN; one line
    naming the settings; nothing left behind."""
    model_file, image = files
    flags = ["--relative-alpha", "--clip", "none", "--alpha", "1e6", "--eps", "none", "--steps", "10"]
    out = tmp_path / "s"
    proc = run_in_process(
        "sweep", image, "--model", model_file, "--labels", "0-3", "--method", "ascent", *flags, "--out", out
    )
    assert_error_after_progress(proc, "hold", "NaN", "nothing is reported", "relative_alpha=True", "alpha=1e+06")
    assert "most aligned" not in proc.stdout and not out.exists()
    fig = tmp_path / "fig.png"
    proc = run_in_process(
        "explain", image, "--model", model_file, "--targets", "0", "--method", "pullback", *flags, "-o", fig
    )
    assert_error_after_progress(proc, "the pullback ascent differences hold", "relative_alpha=True", "clip=none")
    assert not fig.exists()


SHARDED = """
import sys, numpy as np, jax
sys.path.insert(0, {tests!r})
assert len(jax.devices()) == 4, jax.devices()
from conftest import images, torch_and_jax
from jaxpull.shell import sweep as S
model = torch_and_jax("resnet18", 10)[1]
x = images(2, 48, seed=11)
r = S.sweep(model, x, range(10), [0.3, 1.0], chunk_size=3, progress=False)["maps"]
np.save({out!r}, r)
"""


def test_sharded_over_four_cpu_devices_equals_one_device(model, tmp_path):
    out = tmp_path / "sharded.npy"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    code = SHARDED.format(tests=str(Path(__file__).parent), out=str(out))
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    single = S.sweep(model, X, range(10), [0.3, 1.0], chunk_size=3, progress=False)["maps"]
    np.testing.assert_allclose(np.load(out), single, rtol=1e-5, atol=1e-7)


def test_a_model_that_cannot_run_on_the_size_says_so():
    """inception_v3 on a 33x47 image: one line from the model, the pullback, the ascent and a sweep."""
    from jaxpull.core.model import Model, ModelSpec, param_shapes

    spec = ModelSpec("inception_v3", num_classes=10)
    m = Model(jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), param_shapes(spec, 299)), spec)
    x = np.zeros((1, 33, 47, 3), np.float32)
    for call in (
        lambda: m(x),
        lambda: jaxpull.pullback(m, x, [1]),
        lambda: jaxpull.ascent(m, x, [1]),
        lambda: S.sweep(m, x, [1], chunk_size=1, progress=False),
    ):
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value).startswith("inception_v3 cannot run on 33x47 images") and "\n" not in str(e.value)
