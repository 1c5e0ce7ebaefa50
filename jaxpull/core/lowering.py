"""CPU lowerings: the same convolutions and stencils, written so XLA:CPU runs them fast.

XLA:CPU's grouped convolution and its im2col through ``conv_general_dilated_patches`` are slow,
and its loop fusion recomputes a stencil's cotangent once per tap. Each function here computes
exactly what ``lax.conv_general_dilated`` (or the identity) computes, up to float rounding;
``tests/test_layers.py`` pins them to it and ``benchmarks/profile_cpu.py`` measures them.
"""

from __future__ import annotations

from typing import List, Tuple

import jax
import jax.numpy as jnp
from jax import lax


def shifted_views(x: jax.Array, kernel_hw: Tuple[int, int], stride: int, pad) -> List[jax.Array]:
    """The kh*kw strided views of padded ``x`` that a convolution's taps read, in (i, j) order:
    ``x`` ``(N, H, W, C)`` -> kh*kw arrays ``(N, Ho, Wo, C)``; view (i, j) meets ``kernel[i, j]``."""
    kh, kw = kernel_hw
    xp = jnp.pad(x, ((0, 0), tuple(pad[0]), tuple(pad[1]), (0, 0)))
    ho = (xp.shape[1] - kh) // stride + 1
    wo = (xp.shape[2] - kw) // stride + 1
    end = lambda i, j: (xp.shape[0], i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, xp.shape[3])
    return [lax.slice(xp, (0, i, j, 0), end(i, j), (1, stride, stride, 1)) for i in range(kh) for j in range(kw)]


@jax.custom_vjp
def materialised_cotangent(y: jax.Array, witness: jax.Array) -> jax.Array:
    """The identity on ``y``; its VJP hands the cotangent on as an array XLA must write out.

    The transpose of a k*k stencil (:func:`depthwise_conv`) reads its cotangent at k*k shifted
    positions. XLA:CPU fuses whatever computes that cotangent into the stencil and so evaluates it
    k*k times per element: for a gated ReLU6 after a 3x3 depthwise convolution, 18 exponentials
    (and the forward stencil again) instead of 2, which made a gated MobileNetV2 gradient 2.7x
    slower than the vanilla one. A conditional's operand is always materialised, so the cotangent
    passes through one; ``witness`` (a scalar of the forward pass, never NaN in practice) picks
    the branch. Both branches return ``g`` (``g + 0`` differs at most in the sign of a zero, and
    keeps XLA from merging them); the predicate is not batched under ``vmap``, so the
    conditional survives a vmapped pullback.
    """
    return y


def _materialised_fwd(y, witness):
    return y, witness


def _materialised_bwd(witness, g):
    g = lax.cond(jnp.isnan(witness), lambda g: g + 0, lambda g: g, g)
    return g, jnp.zeros_like(witness)


materialised_cotangent.defvjp(_materialised_fwd, _materialised_bwd)


def fence_cotangent_on_cpu(y: jax.Array, source: jax.Array) -> jax.Array:
    """:func:`materialised_cotangent` of ``y`` on CPU (witness: ``source``'s first element, held
    constant), ``y`` itself elsewhere: the duplication was measured on XLA:CPU only, and off CPU a
    conditional can cost a device-to-host sync. ``source`` should be a forward-pass value that a
    vmapped pullback does not batch (the input of the stencil, or its kernel); where it is batched
    (a vmap over images) the conditional becomes a select and the fence is gone, values unchanged."""
    if jax.default_backend() != "cpu":
        return y
    return materialised_cotangent(y, lax.stop_gradient(source.reshape(-1)[0]).astype(jnp.float32))


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, pad) -> jax.Array:
    """Depthwise convolution as a sum of k*k shifted, per-channel-scaled views of ``x``.

    Same result as ``conv_general_dilated(..., feature_group_count=C)`` (``x`` ``(N, H, W, C)``,
    ``kernel`` ``(k, k, 1, C)``), but XLA:CPU's grouped convolution is 10-25x slower than these
    fused elementwise ops, forward and backward (measured on 2 cores at EfficientNet-Lite0's
    shapes; again at MobileNetV2's, batch 30: 5-60x); the sum runs in float32 however ``x`` is
    stored. On CPU the output's cotangent is materialised (:func:`materialised_cotangent`).
    """
    views = shifted_views(x, kernel.shape[:2], stride, pad)
    out = jnp.zeros(views[0].shape, jnp.float32)
    for view, w in zip(views, kernel.reshape(len(views), -1)):
        out = out + view.astype(jnp.float32) * w.astype(jnp.float32)
    return fence_cotangent_on_cpu(out, kernel)


def conv_im2col(x: jax.Array, kernel: jax.Array, stride: int, pad) -> jax.Array:
    """Convolution as one matmul: the shifted views side by side on channels (im2col) times the
    kernel as ``(kh*kw*Cin, Cout)``; ``x`` ``(N, H, W, Cin)`` -> ``(N, Ho, Wo, Cout)`` in float32.
    Its transpose, the input gradient, is one matmul ``dy @ kernel^T`` and kh*kw shifted adds."""
    views = shifted_views(x, kernel.shape[:2], stride, pad)
    cols = views[0] if len(views) == 1 else jnp.concatenate(views, axis=-1)
    n, ho, wo, _ = cols.shape
    y = jnp.dot(cols.reshape(n * ho * wo, -1), kernel.reshape(-1, kernel.shape[-1]), preferred_element_type=jnp.float32)
    return y.reshape(n, ho, wo, -1)


def im2col_on_cpu(kernel_shape: Tuple[int, ...], stride: int) -> bool:
    """Whether XLA:CPU runs a dense convolution faster as :func:`conv_im2col`: every 1x1 one (its
    input gradient at ResNet-50's shapes, batch 100: 1.1-4.3x faster than ``lax.conv``) and the
    strided kxk ones past the stem (1.1-1.4x). Stride-1 kxk ones and the 3-channel stem keep
    ``lax.conv``: writing out the side-by-side views costs more than XLA's kernels save (1.2-3x);
    ``benchmarks/profile_cpu.py`` measures each shape."""
    kh, kw, cin, _ = kernel_shape
    return kh * kw == 1 or (stride > 1 and cin >= 16)
