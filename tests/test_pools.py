"""Ceil-mode max-pool (SqueezeNet, GoogLeNet): torch's forward exactly, and the softmax-pooling
backward over the same windows, zero-filled past the edge like the symmetric padding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jaxpull.core.rules import MaxPool, max_pool as pools
from jaxpull_convert import torch_reference as R

PLAIN = MaxPool(mode="plain")

# less codegen effort: each function runs once or twice, on small inputs (conftest.py)
pytestmark = pytest.mark.quick_compile

# (size, window, stride, padding): ceil mode adds a last window in each of these, except the
# last, where torch's rule (a window must start inside the input or left padding) removes it.
CEIL_CASES = [(7, 2, 2, 0), (8, 3, 2, 0), (8, 3, 2, 1), (13, 2, 2, 0), (6, 3, 2, 1), (5, 2, 2, 1)]


def nchw(x):
    return torch.tensor(np.asarray(x)).permute(0, 3, 1, 2)


def nhwc(t):
    return t.detach().permute(0, 2, 3, 1).numpy()


def case_input(size, seed=0):
    """No ties, so that the vanilla (argmax) gradient is unambiguous."""
    rng = np.random.default_rng(seed)
    return rng.permutation(2 * size * (size + 1) * 3).reshape(2, size, size + 1, 3).astype(np.float32) / 50 - 2


@pytest.mark.parametrize("size,window,stride,padding", CEIL_CASES)
def test_ceil_mode_output_size_and_forward_equal_torch(size, window, stride, padding):
    x = case_input(size)
    ref = F.max_pool2d(nchw(x), window, stride, padding, ceil_mode=True)
    floor = F.max_pool2d(nchw(x), window, stride, padding)
    if (size, window, stride, padding) != (5, 2, 2, 1):
        assert ref.shape[2] == floor.shape[2] + 1  # the case exercises ceil mode's extra window
    else:
        assert ref.shape[2] == floor.shape[2]  # and torch's rule dropping a window past the edge
    assert pools.pool_output_size(size, window, stride, padding, True) == ref.shape[2]
    soft = MaxPool(mode="soft", temperature=0.25)
    for rule in (PLAIN, soft):
        y = rule(jnp.asarray(x), window, stride, padding, ceil_mode=True)
        np.testing.assert_array_equal(y, nhwc(ref))


@pytest.mark.parametrize("size,window,stride,padding", CEIL_CASES)
def test_ceil_mode_vanilla_gradient_is_torch_autograd(size, window, stride, padding):
    x = case_input(size, seed=1)
    xt = nchw(x).requires_grad_(True)
    yt = F.max_pool2d(xt, window, stride, padding, ceil_mode=True)
    g = np.random.default_rng(2).normal(size=nhwc(yt).shape).astype(np.float32)
    yt.backward(nchw(g))
    got = jax.vjp(lambda x: PLAIN(x, window, stride, padding, ceil_mode=True), jnp.asarray(x))[1](jnp.asarray(g))[0]
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(got, nhwc(xt.grad))
    else:  # a GPU sums overlapping windows' gradients in another order: 1 ulp apart (H100: 1.0e-6)
        np.testing.assert_allclose(got, nhwc(xt.grad), rtol=4e-6, atol=0)


@pytest.mark.parametrize("size,window,stride,padding", CEIL_CASES)
@pytest.mark.parametrize("detached", [False, True])
def test_ceil_mode_soft_pool_backward_equals_torch_reference(size, window, stride, padding, detached):
    x = np.random.default_rng(3).normal(size=(2, size, size + 1, 3)).astype(np.float32)
    soft = MaxPool(mode="detached" if detached else "soft", temperature=0.25)
    xt = nchw(x).double().requires_grad_(True)  # float64: the rule's exact value (test_gates.py)
    pool = R.SurrogateMaxPool(torch.nn.MaxPool2d(window, stride, padding, ceil_mode=True), 0.25, detached)
    yt = pool(xt)
    y, vjp = jax.vjp(lambda x: soft(x, window, stride, padding, ceil_mode=True), jnp.asarray(x))
    np.testing.assert_array_equal(y, nhwc(yt).astype(np.float32))
    g = np.random.default_rng(4).normal(size=y.shape).astype(np.float32)
    yt.backward(nchw(g).double())
    np.testing.assert_allclose(vjp(jnp.asarray(g))[0], nhwc(xt.grad), rtol=1e-5, atol=1e-6)


def test_ceil_mode_soft_windows_are_zero_filled_past_the_edge():
    """A 7-wide row pooled 2/2 in ceil mode: the last window is (x6, 0), so a negative x6 shares
    its softmax weight with the zero fill, as a zero-padded border position would."""
    x = jnp.tile(jnp.array([1.0, 2, 3, 4, 5, 6, -1.0]).reshape(1, 1, 7, 1), (1, 2, 1, 1))
    assert pools.window_values(x, 2, 2, 0).shape == (1, 1, 3, 1, 4)
    v = pools.window_values(x, 2, 2, 0, ceil_mode=True)
    assert v.shape == (1, 1, 4, 1, 4)
    np.testing.assert_array_equal(v[0, 0, 3, 0], [-1.0, 0.0, -1.0, 0.0])  # row-major (2, 2) window


def test_pool_larger_than_input_is_a_clear_error():
    with pytest.raises(ValueError, match="larger than the padded input"):
        PLAIN(jnp.zeros((1, 2, 2, 1)), 3, 2, 0, ceil_mode=True)


def test_soft_pool_backward_is_per_image_work_times_the_cotangent():
    """A vmapped pullback (K cotangents, one image) computes the window derivative at the image's
    shape, and no array of K cotangents per window tap exists in the compiled VJP: autodiff's
    softmax backward built one, recomputing the weights' backward per cotangent and tap (1.3 s of
    ResNet-50's 7 s K = 100 pullback)."""
    x = jnp.asarray(np.random.default_rng(6).normal(size=(1, 12, 12, 4)), jnp.float32)
    soft = MaxPool(mode="soft", temperature=0.25)

    def pullbacks(x, gs):
        _, vjp = jax.vjp(lambda x: soft(x, 3, 2, 1), x)
        return jax.vmap(lambda g: vjp(g)[0])(gs)

    gs = jnp.asarray(np.random.default_rng(7).normal(size=(5, 1, 6, 6, 4)), jnp.float32)
    text = jax.jit(pullbacks).lower(x, gs).compile().as_text()
    shapes = [line.split(" = ")[1].split(" ")[0] for line in text.splitlines() if " exponential(" in line]
    assert shapes and all(shape.startswith("f32[1,6,6,4,9]") for shape in shapes), shapes
    assert "f32[5,1,6,6,4,9]" not in text
    expected = jnp.stack([jax.vjp(lambda x: soft(x, 3, 2, 1), x)[1](g)[0] for g in gs])
    np.testing.assert_allclose(jax.jit(pullbacks)(x, gs), expected, rtol=1e-6, atol=1e-7)
