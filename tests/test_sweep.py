"""Sweeps: chunking within a memory budget, streaming to disk, resuming, and sharding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jaxpull
from jaxpull.shell import sweep as S
from conftest import images, torch_and_jax


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
            full[:, k], jaxpull.pullback(model, X, np.arange(10), temperature=t), rtol=1e-5, atol=1e-7
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


def test_memory_budget_sets_the_chunk_and_too_small_is_an_error(model):
    small = S.plan(model, (48, 48, 3), memory_budget=200e6)
    large = S.plan(model, (48, 48, 3), memory_budget=2e9)
    assert 1 <= small.chunk < large.chunk and small.unit_bytes <= 200e6
    with pytest.raises(ValueError, match="too small for one label"):
        S.sweep(model, X, range(10), memory_budget=1e6, progress=False)


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
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["done"] == [0, 1]  # two units finished and recorded
    calls.clear()
    interrupt[0] = False
    r = S.sweep(model, X, range(10), [0.3], out=out, chunk_size=4, progress=False)
    assert len(calls) == 4  # 6 units in all, 2 already written
    assert isinstance(r["maps"], np.memmap)
    loaded = np.load(out / "maps.npy", mmap_mode="r")
    np.testing.assert_allclose(loaded[:, 0], jaxpull.pullback(model, X, np.arange(10)), rtol=1e-5, atol=1e-7)


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
    with pytest.raises(ValueError, match="temperature must be positive"):
        S.sweep(model, X[:1], [1], [0.3, -1.0], progress=False)
    with pytest.raises(ValueError, match="unknown reduce"):
        S.sweep(model, X[:1], [1], reduce="mean", progress=False)
    with pytest.raises(ValueError, match="unknown ascent option"):
        S.sweep(model, X[:1], [1], method="ascent", stepz=3, progress=False)


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
