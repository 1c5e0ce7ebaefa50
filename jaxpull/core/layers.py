"""Layers with PyTorch semantics on NHWC arrays: the building blocks of every architecture.

Shapes follow JAX conventions: images ``(N, H, W, C)``, convolution kernels
``(kh, kw, C_in / groups, C_out)``, dense kernels ``(in, out)``. Padding is always explicit
(``((p, p), (p, p))``, as torch pads), which is what makes the logits match torchvision's.

Eval-mode BatchNorm is an affine map; the converter folds it into the convolution before it
where there is one (``Conv`` with ``use_bias=True``), and stores the rest as ``Affine``.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxpull.core import gates

Padding = Union[int, Tuple[Tuple[int, int], Tuple[int, int]], str]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# The operand dtypes a model's convolutions and dense layers may compute in: a layer takes its
# operands in its kernel's dtype (``Model.astype`` casts the kernels), accumulating in float32.
COMPUTE_DTYPES = ("float32", "bfloat16")


def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``x @ kernel`` with operands in the kernel's dtype, accumulated and returned in float32."""
    return jnp.dot(x.astype(kernel.dtype), kernel, preferred_element_type=jnp.float32)


def to_model_input(x: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """Map images in [-1, 1] to the network's normalisation: ``((x + 1) / 2 - mean) / std``.

    Args:
      x: ``(N, H, W, 3)`` in [-1, 1].
    Returns:
      ``(N, H, W, 3)`` normalised per channel.
    """
    mean = jnp.asarray(mean, x.dtype)
    std = jnp.asarray(std, x.dtype)
    return ((x + 1) / 2 - mean) / std


def same_padding(size: int, kernel: int, stride: int) -> Tuple[int, int]:
    """TensorFlow 'SAME' padding for one spatial axis: (before, after), extra on the after side."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


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
    if jax.default_backend() == "cpu":
        out = materialised_cotangent(out, lax.stop_gradient(kernel.reshape(-1)[0]).astype(jnp.float32))
    return out


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


class Conv(nn.Module):
    """``torch.nn.Conv2d`` on NHWC: explicit padding (an int pads all sides alike), or ``"same"``
    (TensorFlow's). ``kernel_size`` is ``k`` or ``(kh, kw)`` (Inception-v3's 1x7 and 7x1)."""

    features: int
    kernel_size: Union[int, Tuple[int, int]]
    stride: int = 1
    padding: Padding = 0
    groups: int = 1
    use_bias: bool = False
    dtype: Optional[jnp.dtype] = None  # operand dtype; None: the kernel's (float32, or bfloat16 after Model.astype)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = (self.kernel_size,) * 2 if isinstance(self.kernel_size, int) else self.kernel_size
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (kh, kw, x.shape[-1] // self.groups, self.features)
        )
        if self.padding == "same":
            pad = (same_padding(x.shape[1], kh, self.stride), same_padding(x.shape[2], kw, self.stride))
        elif isinstance(self.padding, int):
            pad = ((self.padding, self.padding), (self.padding, self.padding))
        else:
            pad = self.padding
        dtype = kernel.dtype if self.dtype is None else jnp.dtype(self.dtype)
        if self.groups > 1 and self.groups == x.shape[-1] == self.features:
            y = depthwise_conv(x.astype(dtype), kernel.astype(dtype), self.stride, pad)
        elif self.groups == 1 and jax.default_backend() == "cpu" and im2col_on_cpu(kernel.shape, self.stride):
            y = conv_im2col(x.astype(dtype), kernel.astype(dtype), self.stride, pad)  # GPU / TPU: lax.conv
        else:
            y = lax.conv_general_dilated(
                x.astype(dtype),
                kernel.astype(dtype),
                window_strides=(self.stride, self.stride),
                padding=pad,
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=self.groups,
                preferred_element_type=jnp.float32,
            )
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,))
        return y


class Affine(nn.Module):
    """Eval-mode BatchNorm as the affine map it is: ``x * scale + bias`` per channel."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        return x * scale + bias


class Dense(nn.Module):
    """``torch.nn.Linear``: ``x @ kernel + bias`` with ``kernel`` of shape ``(in, out)``."""

    features: int
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        y = matmul(x, kernel)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,))
        return y


class LayerNorm(nn.Module):
    """``torch.nn.LayerNorm(C, eps)`` over the last axis (ConvNeXt's ``LayerNorm2d`` is the same on
    NHWC), with the LayerNorm rule of ``gating`` (``gates.layer_norm``); ``(..., C)`` -> same."""

    eps: float

    @nn.compact
    def __call__(self, x: jax.Array, gating: gates.Gating) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        return gates.layer_norm(x, scale, bias, self.eps, gating)


class SqueezeExcitation(nn.Module):
    """torchvision's ``SqueezeExcitation``: ``x * scale(fc2(activation(fc1(mean(x)))))`` on
    ``(N, H, W, C)``. ``activation`` is a gated unit of :mod:`jaxpull.core.gates` (``relu``, ``silu``:
    its rule applies); ``scale`` (sigmoid, hardsigmoid) and the product keep their plain derivatives."""

    squeeze_channels: int
    activation: Callable[[jax.Array, gates.Gating], jax.Array]
    scale: Callable[[jax.Array], jax.Array] = jax.nn.sigmoid

    @nn.compact
    def __call__(self, x: jax.Array, gating: gates.Gating) -> jax.Array:
        s = jnp.mean(x, axis=(1, 2), keepdims=True)  # (N, 1, 1, C)
        s = self.activation(Conv(self.squeeze_channels, 1, use_bias=True, name="fc1")(s), gating)
        return self.scale(Conv(x.shape[-1], 1, use_bias=True, name="fc2")(s)) * x


def avg_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
    """``torch.nn.AvgPool2d(window, stride)`` (no padding) on ``(N, H, W, C)``."""
    s = lax.reduce_window(x, 0.0, lax.add, (1, window, window, 1), (1, stride, stride, 1), "VALID")
    return s / (window * window)


def _adaptive_matrix(size: int, out: int) -> np.ndarray:
    """(out, size) averaging matrix of torch's adaptive pooling bins [floor(i*s/o), ceil((i+1)*s/o))."""
    m = np.zeros((out, size), np.float32)
    for i in range(out):
        lo = (i * size) // out
        hi = -(-((i + 1) * size) // out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def adaptive_avg_pool(x: jax.Array, output_size: Tuple[int, int]) -> jax.Array:
    """``torch.nn.AdaptiveAvgPool2d(output_size)`` on ``(N, H, W, C)`` -> ``(N, oh, ow, C)``."""
    n, h, w, c = x.shape
    oh, ow = output_size
    if (oh, ow) == (h, w):
        return x
    if (oh, ow) == (1, 1):
        return jnp.mean(x, axis=(1, 2), keepdims=True)
    mh = jnp.asarray(_adaptive_matrix(h, oh), x.dtype)
    mw = jnp.asarray(_adaptive_matrix(w, ow), x.dtype)
    return jnp.einsum("ih,jw,nhwc->nijc", mh, mw, x, precision=lax.Precision.HIGHEST)


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Adaptive average pooling to 1x1 followed by flatten: ``(N, H, W, C)`` -> ``(N, C)``."""
    return jnp.mean(x, axis=(1, 2))


def flatten_chw(x: jax.Array) -> jax.Array:
    """Flatten ``(N, H, W, C)`` in torch's ``(C, H, W)`` order -> ``(N, C*H*W)``."""
    return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


relu = gates.relu
relu6 = gates.relu6
max_pool = gates.max_pool
