"""CPU lowerings: the same convolutions and stencils, written so XLA:CPU runs them fast.

XLA:CPU's grouped convolution and its im2col through ``conv_general_dilated_patches`` are slow,
and its loop fusion recomputes a stencil's cotangent once per tap. Each function here computes
exactly what ``lax.conv_general_dilated`` (or the identity) computes, up to float rounding;
``tests/test_layers.py`` pins them to it and ``benchmarks/profile_cpu.py`` measures them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax


def shifted_views(x: jax.Array, kernel_hw: tuple[int, ...], stride: int, pad) -> list[jax.Array]:
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


def _tap_sum(views: list[jax.Array], kernel: jax.Array) -> jax.Array:
    """``sum_ij views[ij] * kernel[i, j]`` in float32: views ``(N, Ho, Wo, C)``, kernel ``(kh, kw, 1, C)``."""
    out = jnp.zeros(views[0].shape, jnp.float32)
    for view, w in zip(views, kernel.reshape(len(views), -1), strict=True):
        out = out + view.astype(jnp.float32) * w.astype(jnp.float32)
    return out


def scatter_views(g: jax.Array, weights: jax.Array, stride: int, pad, in_hw: tuple[int, int]) -> jax.Array:
    """The transpose of :func:`shifted_views` with weighted taps: ``sum_ij`` of ``g * weights_ij``
    put back where view (i, j) was read (``pad`` and ``in_hw``: the views' padding and the input's
    height and width). ``g`` ``(N, Ho, Wo, C)`` -> ``(N, H, W, C)`` float32.

    ``weights``: ``(kh, kw, C)``, one per tap and channel (a depthwise kernel), or ``(N, Ho, Wo, C,
    kh, kw)``, varying with the output position too (a pooling window's softmax derivative).

    Autodiff's transpose pads each of the kh*kw products back to the input's size and adds them;
    XLA:CPU fuses that into one loop that tests every tap's bounds per element and does not
    vectorise it (ConvNeXt's 7x7 depthwise, 100 cotangents at 56x56x96: 500 ms, 6 GFLOP/s). Here
    every tap reads an in-bounds view of ``g`` padded once. Padded input row ``s*q + r`` receives
    ``g[q - a] * w[s*a + r]`` summed over ``a`` (the phase decomposition of
    :func:`_strided_input_gradient`): phase ``r`` is a stride-1 stencil of ``g`` over the taps
    ``r, r + s, ...``; at stride 1, all of them.
    """
    per_position = weights.ndim == 6
    kh, kw = weights.shape[4:] if per_position else weights.shape[:2]
    s = stride
    a, b = -(-kh // s), -(-kw // s)
    grow = ((a - 1, a - 1), (b - 1, b - 1))
    views = shifted_views(g, (a, b), 1, grow)  # (N, Ho + a - 1, Wo + b - 1, C), view v shifted by (v // b, v % b)
    if per_position:
        n, ho, wo, ch = weights.shape[:4]
        lined_up = [
            u.reshape(u.shape[:3] + (ch, kh, kw))
            for u in shifted_views(weights.reshape(n, ho, wo, -1), (a, b), 1, grow)
        ]
        weight = lambda i, j, v: lined_up[v][..., i, j]
    else:
        weight = lambda i, j, v: weights[i, j]
    phases = []
    for r in range(s):
        for c in range(s):
            phase = jnp.zeros(views[0].shape, jnp.float32)
            for v, view in enumerate(views):
                i, j = s * (a - 1 - v // b) + r, s * (b - 1 - v % b) + c
                if i < kh and j < kw:
                    phase = phase + view.astype(jnp.float32) * weight(i, j, v).astype(jnp.float32)
            phases.append(phase)
    n, rows, cols, ch = phases[0].shape
    full = jnp.stack(phases, axis=3).reshape(n, rows, cols, s, s, ch).transpose(0, 1, 3, 2, 4, 5)
    full = full.reshape(n, rows * s, cols * s, ch)  # the padded input's rows and columns, from 0
    (top, _), (left, _) = pad
    h, w = in_hw
    full = jnp.pad(full, ((0, 0), (0, max(0, top + h - rows * s)), (0, max(0, left + w - cols * s)), (0, 0)))
    return full[:, top : top + h, left : left + w, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise(x: jax.Array, kernel: jax.Array, stride: int, pad) -> jax.Array:
    return _tap_sum(shifted_views(x, kernel.shape[:2], stride, pad), kernel)


def _depthwise_fwd(x, kernel, stride, pad):
    return _depthwise(x, kernel, stride, pad), (x, kernel)


def _depthwise_bwd(stride, pad, residuals, g):
    x, kernel = residuals
    dx = scatter_views(g, kernel.reshape(kernel.shape[:2] + (-1,)), stride, pad, x.shape[1:3])
    dk = jax.vjp(lambda k: _tap_sum(shifted_views(x, k.shape[:2], stride, pad), k), kernel)[1](g)[0]
    return dx.astype(x.dtype), dk


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, pad) -> jax.Array:
    """Depthwise convolution as a sum of k*k shifted, per-channel-scaled views of ``x``.

    Same result as ``conv_general_dilated(..., feature_group_count=C)`` (``x`` ``(N, H, W, C)``,
    ``kernel`` ``(k, k, 1, C)``, ``pad`` a tuple of ``(lo, hi)`` tuples), but XLA:CPU's grouped
    convolution is 10-25x slower than these fused elementwise ops, forward and backward (measured
    on 2 cores at EfficientNet-Lite0's shapes; again at MobileNetV2's, batch 30: 5-60x); the sum
    runs in float32 however ``x`` is stored. The input gradient is the same kind of stencil
    (:func:`scatter_views`). On CPU the output's cotangent is materialised
    (:func:`materialised_cotangent`).
    """
    return fence_cotangent_on_cpu(_depthwise(x, kernel, stride, tuple(map(tuple, pad))), kernel)


def conv_im2col(x: jax.Array, kernel: jax.Array, stride: int, pad) -> jax.Array:
    """Convolution as one matmul: the shifted views side by side on channels (im2col) times the
    kernel as ``(kh*kw*Cin, Cout)``; ``x`` ``(N, H, W, Cin)`` -> ``(N, Ho, Wo, Cout)`` in float32.
    Its transpose, the input gradient, is one matmul ``dy @ kernel^T`` and kh*kw shifted adds."""
    views = shifted_views(x, kernel.shape[:2], stride, pad)
    cols = views[0] if len(views) == 1 else jnp.concatenate(views, axis=-1)
    n, ho, wo, _ = cols.shape
    y = jnp.dot(cols.reshape(n * ho * wo, -1), kernel.reshape(-1, kernel.shape[-1]), preferred_element_type=jnp.float32)
    return y.reshape(n, ho, wo, -1)


def _dense_conv(x: jax.Array, kernel: jax.Array, stride: int, pad) -> jax.Array:
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=pad,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        preferred_element_type=jnp.float32,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def dense_conv(x: jax.Array, kernel: jax.Array, stride: int, pad) -> jax.Array:
    """``lax.conv_general_dilated`` (NHWC, HWIO, float32 result) whose input gradient is a
    convolution with the kernel flipped and transposed to HWIO explicitly.

    Autodiff's transpose of a convolution swaps the kernel's feature axes in the dimension
    numbers instead (``01oi``). Outside a loop XLA:CPU copies the kernel to HWIO and calls its
    Eigen convolution; inside a ``fori_loop`` (the ascent) it does not, and falls back to its
    naive convolution loop: measured 3x slower for four 3x3 convolutions at 256 channels, and 35x
    slower for a VGG ascent at XLA's -O0. This VJP is the same computation, laid out for the fast
    kernel in both places (``tests/test_layers.py`` pins it to autodiff's). A strided
    convolution's input gradient is :func:`_strided_input_gradient`, which skips the zeros that
    dilating the cotangent would multiply. The kernel's own gradient is autodiff's.
    """
    return _dense_conv(x, kernel, stride, pad)


def _dense_conv_fwd(x, kernel, stride, pad):
    return _dense_conv(x, kernel, stride, pad), (x, kernel)


def _strided_input_gradient(g: jax.Array, kernel: jax.Array, stride: int, pad, in_hw) -> jax.Array:
    """Input gradient of a stride-``s`` convolution as one stride-1 convolution with ``s*s`` times
    the output channels, then depth-to-space (the sub-pixel, or phase, decomposition).

    Padded input row ``s*q + r`` receives ``g[q - a] * kernel[s*a + r]`` summed over ``a``: with the
    kernel zero-padded to ``A*s`` taps (``A = ceil(k / s)``) and phase ``r`` moved to channels, that
    is a stride-1 ``A x B`` convolution of ``g``. The usual form dilates ``g`` by ``s`` and so
    multiplies by ``s*s - 1`` zeros out of ``s*s``; this one does no zero work beyond the padded
    taps (ResNet-50's 7x7/2 stem, batch 100: 505 ms against autodiff's 1164 ms in one run).
    ``g`` ``(N, P, Q, Cout)``, ``kernel`` ``(kh, kw, Cin, Cout)`` -> ``(N, H, W, Cin)``.
    """
    s = stride
    kh, kw, cin, cout = kernel.shape
    a, b = -(-kh // s), -(-kw // s)
    kp = jnp.pad(kernel, ((0, a * s - kh), (0, b * s - kw), (0, 0), (0, 0))).reshape(a, s, b, s, cin, cout)
    w = jnp.flip(kp.transpose(0, 2, 5, 1, 3, 4).reshape(a, b, cout, s * s * cin), (0, 1))
    phases = _dense_conv(g, w, 1, ((a - 1, a - 1), (b - 1, b - 1)))  # (N, P + a - 1, Q + b - 1, s*s*Cin)
    n, rows, cols, _ = phases.shape
    full = phases.reshape(n, rows, cols, s, s, cin).transpose(0, 1, 3, 2, 4, 5).reshape(n, rows * s, cols * s, cin)
    (top, _), (left, _) = pad
    (h, wd) = in_hw
    full = jnp.pad(full, ((0, 0), (0, max(0, top + h - rows * s)), (0, max(0, left + wd - cols * s)), (0, 0)))
    return full[:, top : top + h, left : left + wd, :]


def _dense_conv_bwd(stride, pad, residuals, g):
    x, kernel = residuals
    if stride > 1:
        dx = _strided_input_gradient(g.astype(kernel.dtype), kernel, stride, pad, x.shape[1:3])
    else:
        flipped = jnp.flip(kernel, (0, 1)).swapaxes(2, 3)  # (kh, kw, Cout, Cin)
        pads = tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(kernel.shape[:2], pad, strict=True))
        dx = _dense_conv(g.astype(kernel.dtype), flipped, 1, pads)
    dk = jax.vjp(lambda k: _dense_conv(x, k, stride, pad), kernel)[1](g)[0]
    return dx.astype(x.dtype), dk


dense_conv.defvjp(_dense_conv_fwd, _dense_conv_bwd)


def dense_conv_on_cpu(kernel_shape: tuple[int, ...], pad) -> bool:
    """Whether XLA:CPU runs a dense convolution as :func:`dense_conv` (GPU / TPU keep autodiff's
    convolution, fast there): padding of at most ``k - 1`` per side, so the gradient's is >= 0."""
    return all(0 <= lo <= k - 1 and 0 <= hi <= k - 1 for k, (lo, hi) in zip(kernel_shape[:2], pad, strict=True))


def im2col_on_cpu(kernel_shape: tuple[int, ...], stride: int) -> bool:
    """Whether XLA:CPU runs a dense convolution faster as :func:`conv_im2col`: every 1x1 one (its
    input gradient at ResNet-50's shapes, batch 100: 1.1-4.3x faster than ``lax.conv``) and the
    strided kxk ones past the stem (1.1-1.4x). Stride-1 kxk ones and the 3-channel stem stay
    convolutions (:func:`dense_conv`): writing out the side-by-side views costs more than XLA's
    kernels save (1.2-3x); ``benchmarks/profile_cpu.py`` measures each shape."""
    kh, kw, cin, _ = kernel_shape
    return kh * kw == 1 or (stride > 1 and cin >= 16)


# XLA:CPU's convolution is pathologically slow on tiny feature maps: a 3x3 convolution of 512
# channels with a 2x2 output, 2 images, took 17 ms forward and 148 ms for 4 vmapped VJPs, against
# 0.4 ms and 4.4 ms as im2col (the last stage of a ResNet, DenseNet or VGG at 56-64 px inputs);
# from 3x3 outputs on the two are within 1.5-3.5x of each other either way.
TINY_OUTPUT = 4  # output pixels (H * W) at or below which every convolution is im2col on CPU


def cpu_conv(
    kernel_shape: tuple[int, ...], stride: int, pad, out_hw: tuple[int, ...] = (TINY_OUTPUT + 1, 1)
) -> Callable[..., jax.Array] | None:
    """The XLA:CPU lowering of a dense (groups = 1) convolution: :func:`conv_im2col` where
    :func:`im2col_on_cpu` or the output ``out_hw`` has at most :data:`TINY_OUTPUT` pixels, else
    :func:`dense_conv` where :func:`dense_conv_on_cpu`, else None (``lax.conv`` with autodiff's
    transpose). The one place ``layers.Conv`` and ``benchmarks/profile_cpu.py`` take the choice
    from; the function takes ``(x, kernel, stride, pad)`` with ``pad`` a tuple of ``(lo, hi)`` tuples."""
    if im2col_on_cpu(kernel_shape, stride) or out_hw[0] * out_hw[1] <= TINY_OUTPUT:
        return conv_im2col
    if dense_conv_on_cpu(kernel_shape, pad):
        return dense_conv
    return None
