"""The explainers: one signature, and the property each one is defined by."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import images

import jaxpull
from jaxpull import explainers, gates
from jaxpull.gates import Gating

FAST = {"smoothgrad": {"samples": 3}, "smoothgrad_pullback": {"samples": 3}, "integrated_gradients": {"steps": 4},
        "pullback_ascent": {"steps": 2}, "gradient_ascent": {"steps": 2}}


@pytest.mark.parametrize("name", list(explainers.EXPLAINERS))
def test_every_explainer_has_the_common_signature(tiny_model, name):
    x = images(2, 32)
    a = explainers.get(name)(tiny_model, x, [1, 4], **FAST.get(name, {}))
    assert a.shape == (2, 2, 32, 32, 3) and a.dtype == jnp.float32
    assert np.isfinite(np.asarray(a)).all() and float(jnp.abs(a).max()) > 0


def test_definitions_in_terms_of_the_core(tiny_model):
    x = images(2, 32, seed=1)
    t = [[3], [5]]
    grad = explainers.gradient(tiny_model, x, t)
    assert np.allclose(explainers.gradient_x_input(tiny_model, x, t), grad * x[:, None], atol=1e-7)
    assert np.allclose(explainers.pullback(tiny_model, x, t), jaxpull.pullback(tiny_model, x, t, temperature=0.3))
    diff = explainers.pullback_ascent(tiny_model, x, t, steps=2)
    assert np.allclose(diff, jaxpull.ascent(tiny_model, x, t, steps=2) - x[:, None], atol=1e-6)


def test_guided_backprop_rule_by_hand():
    # d/dz sum(w * relu(z)) with w = [1, -1, 2, 3], z = [1, 2, -1, 0]:
    # vanilla [1, -1, 0, 0]; guided drops the negative incoming gradient too: [1, 0, 0, 0]
    w, z = jnp.array([1.0, -1, 2, 3]), jnp.array([1.0, 2, -1, 0])
    vanilla = jax.grad(lambda z: jnp.sum(w * gates.relu(z, gates.VANILLA)))(z)
    guided = jax.grad(lambda z: jnp.sum(w * gates.relu(z, Gating(guided=True))))(z)
    assert vanilla.tolist() == [1, -1, 0, 0] and guided.tolist() == [1, 0, 0, 0]
    z6 = jnp.array([1.0, 7.0, 3.0])
    guided6 = jax.grad(lambda z: jnp.sum(jnp.array([1.0, 1, -1]) * gates.relu6(z, Gating(guided=True))))(z6)
    assert guided6.tolist() == [1, 0, 0]
    with pytest.raises(ValueError, match="no temperature"):
        Gating(0.3, guided=True)


def test_guided_backprop_differs_from_the_gradient(tiny_model):
    x = images(1, 32)
    g = explainers.gradient(tiny_model, x, [2])
    gb = explainers.guided_backprop(tiny_model, x, [2])
    assert not np.allclose(g, gb)


def test_integrated_gradients_completeness(tiny_model):
    # sum of IG = f(x) - f(0) up to the quadrature error of the midpoint rule
    x = images(2, 32, seed=2) * 0.5
    t = np.array([[1], [7]])
    ig = explainers.integrated_gradients(tiny_model, x, t, steps=128)
    logits, zero = np.asarray(tiny_model(x)), np.asarray(tiny_model(np.zeros_like(x)))
    expected = logits[[0, 1], t[:, 0]] - zero[[0, 1], t[:, 0]]
    assert np.allclose(np.asarray(ig).sum(axis=(2, 3, 4))[:, 0], expected, rtol=2e-2, atol=1e-3)


def test_smoothgrad_is_reproducible_and_tends_to_the_gradient(tiny_model):
    x = images(1, 32, seed=3)
    a = explainers.smoothgrad(tiny_model, x, [4], samples=4, seed=7)
    assert np.array_equal(a, explainers.smoothgrad(tiny_model, x, [4], samples=4, seed=7))
    assert not np.array_equal(a, explainers.smoothgrad(tiny_model, x, [4], samples=4, seed=8))
    grad = explainers.gradient(tiny_model, x, [4])
    tiny_noise = explainers.smoothgrad(tiny_model, x, [4], samples=2, sigma=1e-7)
    assert np.allclose(tiny_noise, grad, rtol=1e-3, atol=1e-6)
    pb = explainers.pullback(tiny_model, x, [4])
    assert np.allclose(explainers.smoothgrad_pullback(tiny_model, x, [4], samples=2, sigma=1e-7), pb, rtol=1e-3, atol=1e-6)


def test_bad_input(tiny_model):
    x = images(1, 32)
    with pytest.raises(ValueError, match="unknown explainer 'lime'"):
        explainers.get("lime")
    with pytest.raises(ValueError, match="samples must be a positive integer"):
        explainers.smoothgrad(tiny_model, x, [1], samples=0)
    with pytest.raises(ValueError, match="sigma must be positive"):
        explainers.smoothgrad(tiny_model, x, [1], sigma=-1)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        explainers.integrated_gradients(tiny_model, x, [1], steps=0)
    with pytest.raises(ValueError, match="out of range"):
        explainers.guided_backprop(tiny_model, x, [10])
