"""The public API's properties: batching, files, compilation caching, and bad input."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpull
from conftest import images, torch_and_jax
from jaxpull.core import pullback


@pytest.fixture(scope="module")
def model():
    return torch_and_jax("resnet18", 10)[1]


X = images(3, 48, seed=7)
T = np.array([[0, 3], [5, 9], [2, 2]])


def test_per_example_results_equal_each_example_alone(model):
    batch = jaxpull.pullback(model, X, T)
    for i in range(3):
        alone = jaxpull.pullback(model, X[i : i + 1], T[i : i + 1])
        np.testing.assert_allclose(batch[i], alone[0], rtol=1e-5, atol=1e-6)
    xs = jaxpull.ascent(model, X, T, steps=2)
    np.testing.assert_allclose(xs[1], jaxpull.ascent(model, X[1:2], T[1:2], steps=2)[0], rtol=1e-4, atol=1e-5)


def test_shared_forward_equals_separate_gradients(model):
    shared = jaxpull.pullback(model, X, T)
    rules = jaxpull.resolve()
    # one gradient per target column, each with its own forward (jitted: op by op, it compiled
    # each of its ~250 operations on its own)
    grad = jax.jit(jax.grad(lambda x, m, t: jnp.sum(jnp.take_along_axis(m.apply(x, rules), t, axis=1))))
    for k in range(T.shape[1]):
        separate = grad(X, model, T[:, k : k + 1])
        np.testing.assert_allclose(shared[:, k], separate, rtol=1e-5, atol=1e-6)


def test_targets_shared_by_all_images(model):
    np.testing.assert_array_equal(jaxpull.pullback(model, X, [4, 1]), jaxpull.pullback(model, X, [[4, 1]] * 3))


def test_new_temperature_or_label_does_not_recompile(model):
    jaxpull.pullback(model, X, T, temperature=0.3)
    before = pullback.pullback_core._cache_size()
    jaxpull.pullback(model, X, T + 0, temperature=0.7, pool_temperature=0.1)
    jaxpull.pullback(model, X, T[:, ::-1], temperature=0.05)
    assert pullback.pullback_core._cache_size() == before
    jaxpull.ascent(model, X[:1], T[:1], steps=1)
    before = pullback.ascent_core._cache_size()
    jaxpull.ascent(model, X[:1], T[:1][:, ::-1], steps=3, alpha=5.0, eps=10.0, temperature=0.9)
    assert pullback.ascent_core._cache_size() == before


@pytest.mark.quick_compile  # three functions compiled, each run once or twice (conftest.py)
def test_compare_equals_one_pullback_per_method_and_compiles_once(model):
    """``jaxpull.compare``: the logits and each method's maps equal ``model(x)`` and one
    ``jaxpull.pullback`` per method (the shared forward pass changes nothing but rounding), and
    a new temperature or label does not recompile."""
    got = jaxpull.compare(model, X, T)
    assert list(got.maps) == list(jaxpull.core.settings.COMPARISON) == ["excitation", "semantic", "vanilla gradient"]
    np.testing.assert_allclose(got.logits, model(X), rtol=1e-6, atol=1e-6)
    for name, kw in jaxpull.core.settings.COMPARISON.items():
        alone = np.asarray(jaxpull.pullback(model, X, T, **kw))
        np.testing.assert_allclose(got.maps[name], alone, rtol=1e-5, atol=1e-6 * np.abs(alone).max())
    assert not np.allclose(got.maps["excitation"], got.maps["vanilla gradient"], rtol=1e-2)  # the rows differ
    # other names and temperatures, the same rules: the same compiled function
    before = pullback.compare_core._cache_size()
    methods = {
        "cold": dict(temperature=0.1),
        "warm": dict(rules="semantic", temperature=2.0),
        "plain": "vanilla",
    }
    again = jaxpull.compare(model, X, T[:, ::-1], methods)
    assert pullback.compare_core._cache_size() == before and list(again.maps) == ["cold", "warm", "plain"]
    alone = jaxpull.pullback(model, X, T[:, ::-1], rules="semantic", temperature=2.0)
    np.testing.assert_allclose(again.maps["warm"], alone, rtol=1e-5, atol=1e-6 * np.abs(alone).max())


@pytest.mark.parametrize(
    "methods,message",
    [
        ({}, r"methods must be a non-empty dict"),
        ([("a", {})], r"methods must be a non-empty dict"),
        ({"a": 0.3}, r"method 'a': give a jaxpull.Rules, a preset name or a dict of rules and settings"),
        ({"a": dict(steps=3)}, r"method 'a': unknown setting\(s\) steps: use relu, temperature"),
        ({"a": dict(rules="excitatio")}, r"method 'a': unknown rules 'excitatio': use one of excitation, semantic"),
        ({"a": "excitatio"}, r"method 'a': unknown rules 'excitatio'"),
        ({"a": dict(temperature=-1.0)}, r"method 'a': temperature"),
    ],
)
def test_compare_bad_methods_name_the_method_and_the_fix(model, methods, message):
    with pytest.raises(ValueError, match=message) as e:
        jaxpull.compare(model, X, T, methods)
    assert "\n" not in str(e.value)


def test_vmap_over_temperatures_through_the_public_api(model):
    ts = jnp.array([0.1, 0.3, 2.0])
    swept = jax.vmap(lambda t: jaxpull.pullback(model, X[:1], [3], temperature=t))(ts)
    assert swept.shape == (3, 1, 1, 48, 48, 3)
    for i, t in enumerate([0.1, 0.3, 2.0]):
        np.testing.assert_allclose(swept[i], jaxpull.pullback(model, X[:1], [3], temperature=t), rtol=1e-5, atol=1e-7)


def test_small_temperature_approaches_vanilla_and_is_finite(model):
    """The ReLU and max-pool temperatures to 0 (each rule has its own) give the exact gradient."""
    vanilla = np.asarray(jaxpull.pullback(model, X[:1], [3], rules="vanilla"))
    for t in (1e-6, 1e-20, 1e-45):
        soft = np.asarray(jaxpull.pullback(model, X[:1], [3], temperature=t, pool_temperature=t))
        assert np.all(np.isfinite(soft))
    cos = np.sum(soft * vanilla) / np.linalg.norm(soft) / np.linalg.norm(vanilla)
    assert cos > 0.9999
    # and a large temperature is clearly different: the test can fail
    warm = np.asarray(jaxpull.pullback(model, X[:1], [3], temperature=3.0))
    assert np.sum(warm * vanilla) / np.linalg.norm(warm) / np.linalg.norm(vanilla) < 0.99


def test_ascent_stays_in_the_ball_and_the_box(model):
    xs = np.asarray(jaxpull.ascent(model, X, T, steps=4, alpha=30.0, eps=5.0))
    d = (xs - X[:, None]).reshape(3, 2, -1)
    assert np.all(np.linalg.norm(d, axis=-1) <= 5.0 * (1 + 1e-5))
    assert xs.min() >= -1 and xs.max() <= 1
    diff = jaxpull.ascent(model, X, T, steps=4, alpha=30.0, eps=5.0, output="diff")
    np.testing.assert_allclose(diff, xs - X[:, None], atol=1e-6)


def test_converted_file_round_trips(model, tmp_path):
    path = tmp_path / "m.safetensors"
    jaxpull.save(model, path)
    loaded = jaxpull.load(path)
    assert loaded.arch == "resnet18" and loaded.num_classes == 10
    for a, b in zip(jax.tree_util.tree_leaves(model.params), jax.tree_util.tree_leaves(loaded.params), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(model(X), loaded(X))
    assert not list(tmp_path.glob("*.part"))


def test_loading_and_pullbacks_do_not_import_torch(model, tmp_path):
    path = tmp_path / "m.safetensors"
    jaxpull.save(model, path)
    code = (
        "import sys, numpy as np, jaxpull\n"
        f"m = jaxpull.load({str(path)!r})\n"
        "x = np.zeros((1, 32, 32, 3), np.float32)\n"
        "jaxpull.pullback(m, x, [1]).block_until_ready()\n"
        "jaxpull.ascent(m, x, [1], steps=1).block_until_ready()\n"
        "assert 'torch' not in sys.modules and 'torchvision' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "x,targets,kwargs,message",
    [
        (X[0], [1], {}, r"shape \(N, H, W, 3\).*add a batch axis"),
        (X.transpose(0, 3, 1, 2), [1], {}, "3 channels last.*channels-first"),
        (X * 127.5 + 127.5, [1], {}, r"\[-1, 1\].*0-255"),
        ((X * 127.5 + 127.5).astype(np.uint8), [1], {}, "floating point"),
        (X, [10], {}, r"target label 10 is out of range.*\[0, 10\)"),
        (X, [-1], {}, "out of range"),
        (X, [[1]] * 2, {}, r"shape \(K,\) or \(N, K\)"),
        (X, [], {}, "empty"),
        (X, [1.5], {}, "integer"),
        (X, [1], dict(temperature=0.0), "temperature must be a positive number"),
        (X, [1], dict(temperature=-1.0), "temperature must be a positive number"),
        (X, [1], dict(pool_temperature=float("nan")), "pool_temperature must be a positive number"),
        (X, [1], dict(gate="tanh"), "unknown gate"),
        (X, [1], dict(max_pool="hard"), "unknown max_pool 'hard'"),
        (X, [1], dict(temperature=[0.3, 0.6]), r"temperature.*jax.vmap"),
        (X, [1], dict(steps=3), r"unknown setting\(s\) steps"),
    ],
)
def test_bad_input_is_a_clear_error(model, x, targets, kwargs, message):
    with pytest.raises(ValueError, match=message):
        jaxpull.pullback(model, x, targets, **kwargs)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(steps=-1), "steps"),
        (dict(steps=2.5), "steps"),
        (dict(alpha=0.0), "alpha"),
        (dict(eps=-3.0), "eps"),
        (dict(loss="mse"), "unknown loss"),
        (dict(margin=-0.1), "margin"),
        (dict(output="png"), "unknown output"),
    ],
)
def test_bad_ascent_options_are_clear_errors(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        jaxpull.ascent(model, X, [1], **kwargs)


def test_labels_by_name(tmp_path):
    _, m = torch_and_jax("alexnet")
    assert m.label("goldfish") == 1 and m.label("Goldfish") == 1 and m.label("1") == 1
    with pytest.raises(ValueError, match="did you mean"):
        m.label("gold")


def test_bad_model_files(tmp_path, model):
    with pytest.raises(jaxpull.ModelFileError, match="not found"):
        jaxpull.load(tmp_path / "missing.safetensors")
    path = tmp_path / "m.safetensors"
    jaxpull.save(model, path)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(jaxpull.ModelFileError, match="truncated"):
        jaxpull.load(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a model at all")
    with pytest.raises(jaxpull.ModelFileError, match="safetensors"):
        jaxpull.load(tmp_path / "junk.safetensors")
    from safetensors.numpy import save_file

    save_file({"a": np.zeros(3, np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(jaxpull.ModelFileError, match="not a jaxpull model file"):
        jaxpull.load(tmp_path / "other.safetensors")


def test_written_files_get_the_usual_permissions(model, tmp_path):
    import os

    jaxpull.save(model, tmp_path / "m.safetensors")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_bfloat16_compute_is_opt_in_close_and_compiled_separately(model):
    from helpers import map_errors

    x = images(2, 48, seed=5)
    fast = model.astype("bfloat16")
    assert fast.compute_dtype == "bfloat16" and model.compute_dtype == "float32"
    l32, l16 = np.asarray(model(x)), np.asarray(fast(x))
    assert l16.dtype == np.float32
    # bfloat16 keeps 8 bits of mantissa: about 1e-2 relative, not the float32 parity
    assert np.abs(l32 - l16).max() <= 5e-2 * np.abs(l32).max() and not np.array_equal(l32, l16)
    cos, _ = map_errors(jaxpull.pullback(fast, x, [1, 2]), jaxpull.pullback(model, x, [1, 2]))
    assert cos > 0.9
    # the dtype is visible where it acts: the kernels are bfloat16, everything else stays float32
    dtypes = {(path[-1].key, leaf.dtype.name) for path, leaf in jax.tree_util.tree_leaves_with_path(fast.params)}
    assert dtypes == {("kernel", "bfloat16"), ("bias", "float32")}, dtypes
    assert fast.astype("float32").compute_dtype == "float32"
    with pytest.raises(ValueError, match="unknown compute dtype 'float16'"):
        model.astype("float16")
