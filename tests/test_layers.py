"""The CPU lowerings of ``jaxpull.core.layers`` against ``lax.conv``: same values, same VJPs.

On CPU, ``Conv`` runs depthwise convolutions as shifted views, 1x1 / strided kxk ones as one
matmul (im2col), and the other dense ones with an explicit input gradient (``dense_conv``); off
CPU it runs ``lax.conv_general_dilated``. These tests pin the rewrites to the
``lax`` form (float32, tolerance 1e-5 relative to the largest value), and check that the cotangent
fence of the depthwise convolution is the identity and survives ``vmap``.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxpull.core import lowering

# less codegen effort: each function runs once or twice, on small inputs (conftest.py)
pytestmark = pytest.mark.quick_compile

RNG = np.random.default_rng(0)


def lax_conv(x, kernel, stride, pad, groups=1):
    return lax.conv_general_dilated(
        x,
        kernel,
        (stride, stride),
        pad,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
        precision=lax.Precision.HIGHEST,
    )


def close(a, b, tol=1e-5):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=0, atol=tol * float(np.abs(b).max()))


def value_and_vjps(conv, x, kernel, g):
    """``(conv(x, kernel), d/dx, d/dkernel)`` of ``<g, conv(x, kernel)>``, compiled as one function
    (op by op, a 7x7 stencil's 49 views cost seconds of dispatch)."""
    y, vjp = jax.vjp(conv, x, kernel)
    return (y,) + vjp(g)


def assert_same_as_lax(ours, groups, x, kernel, stride, pad):
    """``ours(x, kernel, stride, pad)`` equals ``lax.conv`` in value and in both VJPs."""
    reference = lambda x, w: lax_conv(x, w, stride, pad, groups)
    g = jnp.asarray(RNG.standard_normal(jax.eval_shape(reference, x, kernel).shape), jnp.float32)
    want = jax.jit(value_and_vjps, static_argnums=0)(reference, x, kernel, g)
    got = jax.jit(value_and_vjps, static_argnums=0)(lambda x, w: ours(x, w, stride, pad), x, kernel, g)
    for a, b in zip(got, want, strict=True):
        close(a, b)


@pytest.mark.parametrize(
    "shape, stride, pad",
    [
        ((3, 3), 1, ((1, 1), (1, 1))),  # MobileNet
        ((3, 3), 1, ((0, 0), (0, 0))),
        ((7, 7), 1, ((3, 3), (3, 3))),  # ConvNeXt
        ((3, 3), 2, ((1, 1), (1, 1))),
        ((3, 3), 2, ((0, 1), (0, 1))),  # TensorFlow's "same" at an even size
        ((5, 5), 2, ((2, 2), (2, 2))),
        ((5, 5), 2, ((1, 2), (1, 2))),
        ((2, 3), 3, ((1, 0), (2, 1))),  # uneven kernel, stride past the kernel's height
    ],
)
@pytest.mark.parametrize("size", [9, 10])
def test_depthwise_views_equal_grouped_lax_conv(shape, stride, pad, size):
    """Value, input gradient (the per-phase stencil of the flipped kernel) and kernel gradient."""
    x = jnp.asarray(RNG.standard_normal((2, size, size, 6)), jnp.float32)
    kernel = jnp.asarray(RNG.standard_normal(shape + (1, 6)), jnp.float32)
    assert_same_as_lax(lowering.depthwise_conv, 6, x, kernel, stride, pad)


@pytest.mark.parametrize(
    "k, stride, pad, size",
    [
        (1, 1, ((0, 0), (0, 0)), 9),
        (1, 2, ((0, 0), (0, 0)), 9),
        (3, 2, ((1, 1), (1, 1)), 9),
        (3, 1, ((1, 1), (1, 1)), 2),  # a tiny output (a ResNet's last stage at 64 px): im2col on CPU
        (3, 1, ((1, 1), (1, 1)), 1),
    ],
)
def test_im2col_equals_lax_conv(k, stride, pad, size):
    x = jnp.asarray(RNG.standard_normal((2, size, size, 16)), jnp.float32)
    kernel = jnp.asarray(RNG.standard_normal((k, k, 16, 8)), jnp.float32)
    assert_same_as_lax(lowering.conv_im2col, 1, x, kernel, stride, pad)


def test_conv_takes_im2col_for_tiny_outputs_only():
    """XLA:CPU's convolution is slow on outputs of a few pixels (lowering.TINY_OUTPUT): there the
    CPU choice is im2col, elsewhere the stride-1 kxk convolution stays ``dense_conv``."""
    pad = ((1, 1), (1, 1))
    assert lowering.cpu_conv((3, 3, 512, 512), 1, pad, (2, 2)) is lowering.conv_im2col
    assert lowering.cpu_conv((3, 3, 512, 512), 1, pad, (1, 1)) is lowering.conv_im2col
    assert lowering.cpu_conv((3, 3, 512, 512), 1, pad, (3, 3)) is lowering.dense_conv
    assert lowering.cpu_conv((3, 3, 512, 512), 1, pad) is lowering.dense_conv


@pytest.mark.parametrize(
    "shape, stride, pad",
    [
        ((3, 3), 1, ((1, 1), (1, 1))),
        ((3, 3), 1, ((0, 0), (0, 0))),
        ((3, 3), 2, ((1, 1), (1, 1))),
        ((3, 3), 2, ((0, 1), (0, 1))),  # TensorFlow's "same" at an even size
        ((7, 7), 2, ((3, 3), (3, 3))),  # the stem
        ((1, 7), 1, ((0, 0), (3, 3))),  # Inception-v3's factorised kernels
        ((5, 5), 3, ((2, 1), (0, 4))),
    ],
)
@pytest.mark.parametrize("size", [9, 10])
def test_dense_conv_equals_lax_conv(shape, stride, pad, size):
    """Value, input gradient (the explicit flipped-kernel convolution) and kernel gradient."""
    x = jnp.asarray(RNG.standard_normal((2, size, size, 5)), jnp.float32)
    kernel = jnp.asarray(RNG.standard_normal(shape + (5, 4)), jnp.float32)
    assert_same_as_lax(lowering.dense_conv, 1, x, kernel, stride, pad)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU lowering")
@pytest.mark.parametrize("stride", [1, 2])
def test_dense_conv_gradient_in_a_loop_is_an_eigen_convolution(stride):
    """Inside ``fori_loop`` (the ascent) autodiff's input gradient is a ``01oi`` convolution that
    XLA:CPU runs as its naive loop; ``dense_conv``'s is ``01io`` everywhere, and a strided one's
    has no dilated cotangent (``lhs_dilate``: the zeros the phase decomposition skips)."""
    x = jnp.asarray(RNG.standard_normal((2, 8, 8, 16)), jnp.float32)
    kernel = jnp.asarray(RNG.standard_normal((3, 3, 16, 16)), jnp.float32)
    pad = ((1, 1), (1, 1))

    def compiled(conv):
        step = jax.grad(lambda x: jnp.sum(jnp.tanh(conv(x, kernel, stride, pad))))
        loop = jax.jit(lambda x: lax.fori_loop(0, 2, lambda i, x: x + step(x), x))
        return loop.lower(x).compile().as_text()

    labels = lambda text: set(re.findall(r"dim_labels=([^,]+)", text))
    autodiff, dense = compiled(lambda *a: lax_conv(*a)), compiled(lowering.dense_conv)
    assert "b01f_01oi->b01f" in labels(autodiff)  # what this works around
    assert labels(dense) == {"b01f_01io->b01f"}
    assert ("lhs_dilate=2x2" in autodiff) == (stride == 2) and "lhs_dilate" not in dense


@pytest.mark.parametrize("witness", [1.0, float("nan")])
def test_materialised_cotangent_is_the_identity_both_ways(witness):
    y = jnp.asarray(RNG.standard_normal((3, 4)), jnp.float32)
    w = jnp.float32(witness)
    out, vjp = jax.vjp(lambda y: lowering.materialised_cotangent(y, w), y)
    g = jnp.asarray(RNG.standard_normal((3, 4)), jnp.float32)
    np.testing.assert_array_equal(out, y)
    np.testing.assert_array_equal(vjp(g)[0], g)
    batched = jax.vmap(lambda g: vjp(g)[0])(jnp.stack([g, 2 * g]))
    np.testing.assert_array_equal(batched, jnp.stack([g, 2 * g]))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the fence is a CPU lowering")
def test_depthwise_fence_survives_a_vmapped_vjp():
    """The conditional that materialises the cotangent must still be in the compiled pullback
    (vmap over cotangents, as ``pullback`` runs it): a batched predicate would turn it into a
    select that XLA fuses away, and the gated MobileNet backward would be 3-4x slower again."""
    x = jnp.asarray(RNG.standard_normal((1, 8, 8, 4)), jnp.float32)
    kernel = jnp.asarray(RNG.standard_normal((3, 3, 1, 4)), jnp.float32)
    pad = ((1, 1), (1, 1))

    def pullbacks(x, kernel, gs):
        _, vjp = jax.vjp(lambda x: jax.nn.sigmoid(lowering.depthwise_conv(x, kernel, 1, pad)), x)
        return jax.vmap(lambda g: vjp(g)[0])(gs)

    gs = jnp.asarray(RNG.standard_normal((5, 1, 8, 8, 4)), jnp.float32)
    compiled = jax.jit(pullbacks).lower(x, kernel, gs).compile().as_text()
    assert "conditional(" in compiled
    expected = jax.vmap(lambda g: jax.vjp(lambda x: jax.nn.sigmoid(lax_conv(x, kernel, 1, pad, 4)), x)[1](g)[0])(gs)
    close(jax.jit(pullbacks)(x, kernel, gs), expected)


def test_the_suite_compiles_with_less_codegen_effort():
    """This module is marked ``quick_compile``: conftest.py lowers XLA's codegen effort for it."""
    assert jax.config.read("jax_disable_most_optimizations") is True
