"""Layers with PyTorch semantics on NHWC arrays: the building blocks of every architecture.

Shapes follow JAX conventions: images ``(N, H, W, C)``, convolution kernels
``(kh, kw, C_in / groups, C_out)``, dense kernels ``(in, out)``. Padding is always explicit
(``((p, p), (p, p))``, as torch pads), which is what makes the logits match torchvision's.

Eval-mode BatchNorm is an affine map; the converter folds it into the convolution before it
where there is one (``Conv`` with ``use_bias=True``), and stores the rest as ``Affine``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxpull.core.lowering import cpu_conv, depthwise_conv
from jaxpull.core.rules import Rules

Pad = tuple[tuple[int, int], tuple[int, int]]  # ((top, bottom), (left, right))
Padding = int | Pad | str

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
    m, s = jnp.asarray(mean, x.dtype), jnp.asarray(std, x.dtype)
    return ((x + 1) / 2 - m) / s


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding for one spatial axis: (before, after), extra on the after side."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Conv(nn.Module):
    """``torch.nn.Conv2d`` on NHWC: explicit padding (an int pads all sides alike), or ``"same"``
    (TensorFlow's). ``kernel_size`` is ``k`` or ``(kh, kw)`` (Inception-v3's 1x7 and 7x1)."""

    features: int
    kernel_size: int | tuple[int, int]
    stride: int = 1
    padding: Padding = 0
    groups: int = 1
    use_bias: bool = False
    dtype: jnp.dtype | None = None  # operand dtype; None: the kernel's (float32, or bfloat16 after Model.astype)

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
            # hashable: dense_conv takes it as a static argument (here the padding is the pairs, not a str)
            pad = cast(Pad, tuple(map(tuple, self.padding)))
        dtype = kernel.dtype if self.dtype is None else jnp.dtype(self.dtype)
        on_cpu = jax.default_backend() == "cpu"
        out_hw = tuple(
            (size + lo + hi - k) // self.stride + 1
            for size, (lo, hi), k in zip(x.shape[1:3], pad, (kh, kw), strict=True)
        )
        lowered = cpu_conv(kernel.shape, self.stride, pad, out_hw) if self.groups == 1 and on_cpu else None
        if self.groups > 1 and self.groups == x.shape[-1] == self.features:
            y = depthwise_conv(x.astype(dtype), kernel.astype(dtype), self.stride, pad)
        elif lowered is not None:  # GPU / TPU: lax.conv
            y = lowered(x.astype(dtype), kernel.astype(dtype), self.stride, pad)
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


class Projection(nn.Module):
    """``torch.nn.Linear`` in its two parts: ``(N..., in)`` -> ``(x @ kernel, bias)`` (bias
    ``(out,)`` or None). An attention layer's in-projection: the attention rule scales the
    product and not the bias (``rules.attention``). Parameters as :class:`Dense`'s."""

    features: int
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,)) if self.use_bias else None
        return matmul(x, kernel), bias


class LayerNorm(nn.Module):
    """``torch.nn.LayerNorm(C, eps)`` over the last axis (ConvNeXt's ``LayerNorm2d`` is the same on
    NHWC), with the LayerNorm rule (``rules.layer_norm``); ``(..., C)`` -> same."""

    eps: float

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        return rules.layer_norm(x, scale, bias, self.eps)


class SqueezeExcitation(nn.Module):
    """torchvision's ``SqueezeExcitation``: ``x * scale(fc2(activation(fc1(mean(x)))))`` on
    ``(N, H, W, C)``. ``activation`` names the rule of its activation (``"relu"``, ``"silu"``: a field
    of :class:`~jaxpull.core.rules.Rules`, whose rule applies); ``scale`` (sigmoid, hardsigmoid) and
    the product keep their plain derivatives."""

    squeeze_channels: int
    activation: str
    scale: Callable[[jax.Array], jax.Array] = jax.nn.sigmoid

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        s = jnp.mean(x, axis=(1, 2), keepdims=True)  # (N, 1, 1, C)
        s = getattr(rules, self.activation)(Conv(self.squeeze_channels, 1, use_bias=True, name="fc1")(s))
        return self.scale(Conv(x.shape[-1], 1, use_bias=True, name="fc2")(s)) * x


def avg_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
    """``torch.nn.AvgPool2d(window, stride)`` (no padding) on ``(N, H, W, C)``."""
    s = lax.reduce_window(x, 0.0, lax.add, (1, window, window, 1), (1, stride, stride, 1), "VALID")
    return s / (window * window)


def avg_pool_ceil(x: jax.Array, window: int, stride: int) -> jax.Array:
    """``torch.nn.AvgPool2d(window, stride, ceil_mode=True)`` (no padding) on ``(N, H, W, C)``: the
    windows that reach past the bottom / right edge average their in-image values only (timm's
    ResNet-D downsampling, ``count_include_pad=False``)."""
    _, h, w, _ = x.shape

    def extra(size: int) -> int:  # how far the last ceil-mode window reaches past the edge
        out = -(-(size - window) // stride) + 1
        if (out - 1) * stride >= size:  # torch: the last window must start inside the input
            out -= 1
        return max((out - 1) * stride + window - size, 0)

    pad = ((0, 0), (0, extra(h)), (0, extra(w)), (0, 0))
    dims, strides = (1, window, window, 1), (1, stride, stride, 1)
    s = lax.reduce_window(x, 0.0, lax.add, dims, strides, pad)
    count = lax.reduce_window(jnp.ones((1, h, w, 1), x.dtype), 0.0, lax.add, dims, strides, pad)
    return s / count


def _adaptive_matrix(size: int, out: int) -> np.ndarray:
    """(out, size) averaging matrix of torch's adaptive pooling bins [floor(i*s/o), ceil((i+1)*s/o))."""
    m = np.zeros((out, size), np.float32)
    for i in range(out):
        lo = (i * size) // out
        hi = -(-((i + 1) * size) // out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def adaptive_avg_pool(x: jax.Array, output_size: tuple[int, int]) -> jax.Array:
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
