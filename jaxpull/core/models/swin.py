"""Swin Transformer: torchvision's swin_t, swin_s, swin_b (V1) and swin_v2_t, swin_v2_s, swin_v2_b (V2),
and timm's ``timm/swin_tiny_patch4_window7_224``, ``timm/swin_small_patch4_window7_224``,
``timm/swin_base_patch4_window7_224`` (V1).

A 4x4/4 patch embedding (convolution + LayerNorm), stages of Swin blocks (shifted-window
self-attention and a GELU MLP, each residual) with patch merging between stages, a final
LayerNorm, a global average pool and ``head``. Windows are ``window_size`` tokens; every second
block of a stage shifts them cyclically by half a window and masks (-100) the pairs that the
shift brought together, exactly as torchvision's ``shifted_window_attention`` (inputs padded to
window multiples with zeros before the projections, no shift along an axis the window covers).

V1 adds a learned relative position bias (``relative_position_bias_table``) to the scaled
dot-product scores; V2 uses cosine attention scaled by ``exp(min(logit_scale, log 100))`` and a
continuous bias ``16 * sigmoid(cpb_mlp(coords))`` (computed in the forward pass from the converted
``cpb_mlp``; it does not depend on the image, so its ReLU is plain), puts the block's norms after
attention and MLP (res-post-norm), merges patches with the norm after the reduction, and has no
key bias (torchvision zeroes that third of ``qkv.bias`` in its forward pass).

Rules (docs/method.md, "The rules"): every LayerNorm is ``rules.layer_norm``, every GELU
``rules.gelu``, each window attention layer's rule is ``rules.attention`` (its
q and k projections scaled, their biases and v not) and its softmax is
``rules.attention.probs`` (the "value_only" rule). The relative position bias and the shift
mask are added to the scores unscaled. The paper's code swaps modules, so it misses torchvision's
functional softmax here; jaxpull applies the rule.

Parameter names follow torchvision's keys (``features_1_0/attn/proj`` is ``features.1.0.attn.proj``),
except that ``qkv`` is split into ``q``, ``k`` and ``v`` (the attention rule treats them apart).

timm's ``SwinTransformer`` (:class:`TimmSwinTransformer`) computes V1's blocks, patch merging
(the same channel order: timm's ``reshape(B, H/2, 2, W/2, 2, C).permute(0, 1, 3, 4, 2, 5)`` is
torchvision's ``x0, x1, x2, x3`` = rows/columns (even, even), (odd, even), (even, odd), (odd,
odd)), relative position index (the same formula) and shift mask (-100, computed on the padded
map), with three differences: its patch merging sits at the start of stages 2, 3, 4 (the same
sequence of layers); each block's window and shift are fixed by the feature size the model was
built for (``img_size``): along an axis whose size ``r`` is at most the window, the window
shrinks to ``r`` and the shift is 0, where torchvision keeps the window and pads; and a map whose
size is no multiple of the window is rolled by the shift *before* it is zero-padded (torchvision:
padded, then rolled). timm's model takes its ``img_size`` only (``strict_img_size``), and so does
this module (``image_size``). Its keys: ``patch_embed.proj`` / ``norm`` -> ``features_0_0`` /
``features_0_2``, ``layers.i.downsample`` -> ``features_{2i}``, ``layers.i.blocks.j`` ->
``features_{2i+1}_{j}`` (``mlp.fc1`` / ``fc2`` -> ``mlp_0`` / ``mlp_3``), ``head.fc`` -> ``head``.
Its attention rule is the same ``rules.attention`` (timm computes the softmax in
``F.scaled_dot_product_attention`` or ``nn.Softmax``; the reference patches timm's
``WindowAttention``, ``jaxpull_convert.timm_reference``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Annotated, Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxpull.core.layers import Conv, Dense, LayerNorm, Projection
from jaxpull.core.models import options
from jaxpull.core.models.family import Family
from jaxpull.core.preprocessing import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, Preprocessing
from jaxpull.core.rules import Rules

LN_EPS = 1e-5
MASK = -100.0  # torchvision's score for token pairs that the cyclic shift brought together
CPB_HIDDEN = 512  # width of V2's continuous position bias MLP

# torchvision's builders: patch_size, embed_dim, depths, num_heads, window_size (V2: plus its blocks).
_V1: dict[str, Any] = dict(patch_size=(4, 4), window_size=(7, 7))
_V2: dict[str, Any] = dict(patch_size=(4, 4), window_size=(8, 8), v2=True)
SETTINGS: dict[str, dict[str, Any]] = {
    "swin_t": dict(_V1, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "swin_s": dict(_V1, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "swin_b": dict(_V1, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "swin_v2_t": dict(_V2, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "swin_v2_s": dict(_V2, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "swin_v2_b": dict(_V2, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
}

# torchvision's weights transforms (Swin_*_Weights.IMAGENET1K_V1.transforms(), read once):
# crop, resize, bicubic.
PREPROCESSING = {
    "swin_t": Preprocessing(224, 232, "bicubic"),
    "swin_s": Preprocessing(224, 246, "bicubic"),
    "swin_b": Preprocessing(224, 238, "bicubic"),
    "swin_v2_t": Preprocessing(256, 260, "bicubic"),
    "swin_v2_s": Preprocessing(256, 260, "bicubic"),
    "swin_v2_b": Preprocessing(256, 272, "bicubic"),
}


# --------------------------------------------------------------------------------------
# Constants of a window: relative position index, V2's coordinate table, the shift mask
# --------------------------------------------------------------------------------------
# Windows and shifts are (height, width) pairs, typed tuple[int, ...]: they arrive as tuple(...) of a config's lists.


def relative_position_index(window: tuple[int, ...]) -> np.ndarray:
    """``(Wh*Ww * Wh*Ww,)``: each token pair's row of the bias table (torchvision's buffer)."""
    wh, ww = window
    coords = np.stack(np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij")).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)  # (N, N, 2)
    return ((rel[..., 0] + wh - 1) * (2 * ww - 1) + rel[..., 1] + ww - 1).reshape(-1)


def relative_coords_table(window: tuple[int, ...]) -> np.ndarray:
    """``(1, 2Wh-1, 2Ww-1, 2)``: V2's log-spaced relative coordinates (float32, as torch computes)."""
    wh, ww = window
    h = np.arange(-(wh - 1), wh, dtype=np.float32)
    w = np.arange(-(ww - 1), ww, dtype=np.float32)
    table = np.stack(np.meshgrid(h, w, indexing="ij"), axis=-1)[None]
    table[..., 0] /= np.float32(wh - 1)
    table[..., 1] /= np.float32(ww - 1)
    table *= np.float32(8)
    return (np.sign(table) * np.log2(np.abs(table) + np.float32(1)) / np.float32(3)).astype(np.float32)


def shift_mask(padded: tuple[int, int], window: tuple[int, ...], shift: tuple[int, ...]) -> np.ndarray:
    """``(num_windows, N, N)``: 0 for token pairs of the same region of the shifted map, -100 else."""
    (ph, pw), (wh, ww), (sh, sw) = padded, window, shift
    regions = np.zeros((ph, pw), np.float32)
    count = 0
    for h in (slice(0, -wh), slice(-wh, -sh), slice(-sh, None)):
        for w in (slice(0, -ww), slice(-ww, -sw), slice(-sw, None)):
            regions[h, w] = count
            count += 1
    regions = regions.reshape(ph // wh, wh, pw // ww, ww).transpose(0, 2, 1, 3).reshape(-1, wh * ww)
    return np.where(regions[:, None, :] - regions[:, :, None] != 0, MASK, 0.0).astype(np.float32)


def relative_position_bias(table: jax.Array, window: tuple[int, ...], v2: bool) -> jax.Array:
    """``(1, heads, N, N)`` from a ``((2Wh-1)(2Ww-1), heads)`` table: its entries (V1), or
    ``16 * sigmoid`` of them (V2, whose table is ``cpb_mlp`` of :func:`relative_coords_table`)."""
    n = window[0] * window[1]
    bias = table[relative_position_index(window)].reshape(n, n, -1).transpose(2, 0, 1)[None]
    return 16 * jax.nn.sigmoid(bias) if v2 else bias


def l2_normalize(t: jax.Array) -> jax.Array:
    """``F.normalize(t, dim=-1)``: ``t / max(||t||, 1e-12)``, with torch's zero gradient of the norm
    below 1e-12 (V2's padded tokens have all-zero keys; ``jnp.linalg.norm`` would give NaN there)."""
    return t / jnp.sqrt(jnp.maximum(jnp.sum(t * t, axis=-1, keepdims=True), 1e-24))


# --------------------------------------------------------------------------------------
# Window partition
# --------------------------------------------------------------------------------------


def window_partition(x: jax.Array, window: tuple[int, ...], shift: tuple[int, ...]) -> jax.Array:
    """``(B, H, W, C)`` (padded to window multiples) -> ``(B * nW, Wh*Ww, C)``, rolled by ``-shift``."""
    b, h, w, c = x.shape
    wh, ww = window
    if sum(shift) > 0:
        x = jnp.roll(x, (-shift[0], -shift[1]), axis=(1, 2))
    x = x.reshape(b, h // wh, wh, w // ww, ww, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, c)


def window_reverse(
    x: jax.Array, shape: tuple[int, int, int], window: tuple[int, ...], shift: tuple[int, ...]
) -> jax.Array:
    """Inverse of :func:`window_partition`: ``(B * nW, Wh*Ww, C)`` -> ``(B, H, W, C)``."""
    b, h, w = shape
    wh, ww = window
    x = x.reshape(b, h // wh, w // ww, wh, ww, -1).transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, -1)
    if sum(shift) > 0:
        x = jnp.roll(x, shift, axis=(1, 2))
    return x


# --------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------


class ShiftedWindowAttention(nn.Module):
    """torchvision's ``ShiftedWindowAttention`` (V1) / ``ShiftedWindowAttentionV2`` on ``(B, H, W, C)``."""

    window_size: tuple[int, ...]  # (height, width), as are the shift's
    shift_size: tuple[int, ...]
    num_heads: int
    v2: bool = False
    roll_first: bool = False  # timm: roll the map, then pad it; window and shift as given

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        b, h, w, c = x.shape
        heads, (wh, ww) = self.num_heads, self.window_size
        pad_h, pad_w = -h % wh, -w % ww
        padded = (h + pad_h, w + pad_w)
        if self.roll_first:
            shift = tuple(self.shift_size)
        else:  # torchvision: no shift along an axis that one window covers
            shift = tuple(
                0 if win >= size else s for win, size, s in zip(self.window_size, padded, self.shift_size, strict=True)
            )
        if self.v2:  # the continuous position bias: an MLP of the window's constant coordinates
            coords = jnp.asarray(relative_coords_table(self.window_size))
            hidden = jax.nn.relu(Dense(CPB_HIDDEN, name="cpb_mlp_0")(coords))
            table = Dense(heads, use_bias=False, name="cpb_mlp_2")(hidden).reshape(-1, heads)
        else:
            table = self.param(
                "relative_position_bias_table",
                nn.initializers.truncated_normal(0.02),
                ((2 * wh - 1) * (2 * ww - 1), heads),
            )
        bias = relative_position_bias(table, self.window_size, self.v2)
        if self.v2:
            logit_scale = self.param("logit_scale", nn.initializers.constant(math.log(10.0)), (heads, 1, 1))
        mask = jnp.asarray(shift_mask(padded, self.window_size, shift)) if sum(shift) > 0 else None

        def pad(t: jax.Array) -> jax.Array:
            return jnp.pad(t, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))

        def windows(t: jax.Array) -> jax.Array:
            if self.roll_first:  # timm: the unpadded map rolled, then padded, then cut
                rolled = jnp.roll(t, (-shift[0], -shift[1]), axis=(1, 2)) if sum(shift) > 0 else t
                return window_partition(pad(rolled), self.window_size, (0, 0))
            return window_partition(pad(t), self.window_size, shift)

        def split_heads(t: jax.Array) -> jax.Array:  # (B*nW, N, C) -> (B*nW, heads, N, C / heads)
            return t.reshape(t.shape[0], t.shape[1], heads, c // heads).transpose(0, 2, 1, 3)

        def core(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:  # (B*nW, N, C) each
            q, k, v = split_heads(q), split_heads(k), split_heads(v)
            if self.v2:  # cosine attention
                scores = l2_normalize(q) @ l2_normalize(k).swapaxes(-2, -1)
                scores = scores * jnp.exp(jnp.minimum(logit_scale, math.log(100.0)))
            else:
                scores = (q * (c // heads) ** -0.5) @ k.swapaxes(-2, -1)
            scores = scores + bias
            if mask is not None:
                n = scores.shape[-1]
                scores = (scores.reshape(b, -1, heads, n, n) + mask[None, :, None]).reshape(-1, heads, n, n)
            probs = rules.attention.probs(scores)
            return (probs @ v).transpose(0, 2, 1, 3).reshape(q.shape[0], -1, c)

        tokens = windows(x)
        q, q_bias = Projection(c, name="q")(tokens)
        k, k_bias = Projection(c, use_bias=not self.v2, name="k")(tokens)  # V2 has no key bias
        out = rules.attention(core, q, k, Dense(c, name="v")(tokens), q_bias, k_bias)
        out = Dense(c, name="proj")(out)
        if self.roll_first:
            y = window_reverse(out, (b,) + padded, self.window_size, (0, 0))[:, :h, :w]
            return jnp.roll(y, shift, axis=(1, 2)) if sum(shift) > 0 else y
        return window_reverse(out, (b,) + padded, self.window_size, shift)[:, :h, :w]


class SwinTransformerBlock(nn.Module):
    """V1: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``; V2: ``x + norm1(attn(x))``, ``x + norm2(mlp(x))``."""

    num_heads: int
    window_size: tuple[int, ...]  # (height, width), as are the shift's
    shift_size: tuple[int, ...]
    mlp_ratio: float = 4.0
    v2: bool = False
    roll_first: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        dim = x.shape[-1]
        attn = ShiftedWindowAttention(
            self.window_size, self.shift_size, self.num_heads, self.v2, self.roll_first, name="attn"
        )
        norm1, norm2 = LayerNorm(LN_EPS, name="norm1"), LayerNorm(LN_EPS, name="norm2")

        def mlp(y: jax.Array) -> jax.Array:  # torchvision's MLP: Linear, GELU, (Dropout), Linear, (Dropout)
            y = rules.gelu(Dense(int(dim * self.mlp_ratio), name="mlp_0")(y))
            return Dense(dim, name="mlp_3")(y)

        if self.v2:
            x = x + norm1(attn(x, rules), rules)
            return x + norm2(mlp(x), rules)
        x = x + attn(norm1(x, rules), rules)
        return x + mlp(norm2(x, rules))


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated (odd sizes zero-padded): V1 ``reduction(norm(x))``, V2 ``norm(reduction(x))``."""

    v2: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        dim = x.shape[-1]
        x = jnp.pad(x, ((0, 0), (0, x.shape[1] % 2), (0, x.shape[2] % 2), (0, 0)))
        x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
        reduction, norm = Dense(2 * dim, use_bias=False, name="reduction"), LayerNorm(LN_EPS, name="norm")
        return norm(reduction(x), rules) if self.v2 else reduction(norm(x, rules))


class SwinTransformer(nn.Module):
    """torchvision ``SwinTransformer``: patch embedding, stages of Swin blocks with patch merging
    between them, LayerNorm, global average pool, ``head``.

    ``__call__``: ``(N, H, W, 3)`` normalised images (any size of at least one patch) -> ``(N, num_classes)``.
    """

    patch_size: tuple[int, int]
    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: tuple[int, int]
    v2: bool = False
    mlp_ratio: float = 4.0
    num_classes: int = 1000

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        ph, pw = self.patch_size
        if ph != pw:
            raise ValueError(f"patch_size {tuple(self.patch_size)} is not square: jaxpull's Swin needs square patches")
        if x.shape[1] < ph or x.shape[2] < pw:
            raise ValueError(
                f"a {x.shape[1]}x{x.shape[2]} image is smaller than one {ph}x{pw} patch: "
                f"use images of at least {ph}x{pw} pixels (the ImageNet weights expect 224x224, V2's 256x256)"
            )
        x = Conv(self.embed_dim, (ph, pw), ph, use_bias=True, name="features_0_0")(x)
        x = LayerNorm(LN_EPS, name="features_0_2")(x, rules)
        for i, (depth, heads) in enumerate(zip(self.depths, self.num_heads, strict=True)):
            for j in range(depth):
                shift = (0, 0) if j % 2 == 0 else tuple(w // 2 for w in self.window_size)
                x = SwinTransformerBlock(
                    heads, tuple(self.window_size), shift, self.mlp_ratio, self.v2, name=f"features_{2 * i + 1}_{j}"
                )(x, rules)
            if i < len(self.depths) - 1:
                x = PatchMerging(self.v2, name=f"features_{2 * i + 2}")(x, rules)
        x = LayerNorm(LN_EPS, name="norm")(x, rules)
        return Dense(self.num_classes, name="head")(jnp.mean(x, axis=(1, 2)))


class TimmSwinTransformer(nn.Module):
    """timm's ``SwinTransformer`` (V1, see the module docstring): the parameters of
    :class:`SwinTransformer`, each block's window and shift fixed as timm fixes them for
    ``image_size``; ``(N, S, S, 3)`` -> ``(N, num_classes)``, S = image_size."""

    patch_size: tuple[int, int]
    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: tuple[int, int]
    image_size: int = 224
    mlp_ratio: float = 4.0
    num_classes: int = 1000

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        s, (ph, pw) = self.image_size, self.patch_size
        if ph != pw or s % ph:
            raise ValueError(
                f"patch_size {tuple(self.patch_size)} must be square and divide image_size {s}: "
                "use timm's square patches and an image size that is a multiple of them"
            )
        if x.shape[1:3] != (s, s):
            raise ValueError(
                f"this Swin takes {s}x{s} images (timm fixes its windows for that size), got "
                f"{x.shape[1]}x{x.shape[2]}: resize the images to {s}x{s}"
            )
        x = Conv(self.embed_dim, (ph, pw), ph, use_bias=True, name="features_0_0")(x)
        x = LayerNorm(LN_EPS, name="features_0_2")(x, rules)
        for i, (depth, heads) in enumerate(zip(self.depths, self.num_heads, strict=True)):
            if i > 0:
                x = PatchMerging(False, name=f"features_{2 * i}")(x, rules)
            window, shift = timm_window_and_shift(x.shape[1:3], tuple(self.window_size))
            for j in range(depth):
                x = SwinTransformerBlock(
                    heads,
                    window,
                    (0, 0) if j % 2 == 0 else shift,
                    self.mlp_ratio,
                    False,
                    True,
                    name=f"features_{2 * i + 1}_{j}",
                )(x, rules)
        x = LayerNorm(LN_EPS, name="norm")(x, rules)
        return Dense(self.num_classes, name="head")(jnp.mean(x, axis=(1, 2)))


def timm_window_and_shift(size: tuple[int, ...], window: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """timm's ``SwinTransformerBlock._calc_window_shift`` for a stage of feature ``size``: along an
    axis of size at most the window, the window shrinks to the size and the shift is 0; otherwise
    the window stays and shifted blocks shift by half of it."""
    win = tuple(r if r <= w else w for r, w in zip(size, window, strict=True))
    shift = tuple(0 if r <= v else w // 2 for r, v, w in zip(size, win, window, strict=True))
    return win, shift


# timm's swin_*_patch4_window7_224 (timm 1.0.31): torchvision's V1 sizes, 224 px.
TIMM_SETTINGS: dict[str, dict[str, Any]] = {
    "timm/swin_tiny_patch4_window7_224": dict(
        patch_size=(4, 4), window_size=(7, 7), embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)
    ),
    "timm/swin_small_patch4_window7_224": dict(
        patch_size=(4, 4), window_size=(7, 7), embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)
    ),
    "timm/swin_base_patch4_window7_224": dict(
        patch_size=(4, 4), window_size=(7, 7), embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)
    ),
}
# timm's pretrained_cfg of their default weights (ms_in1k, ms_in22k_ft_in1k; read once): 224,
# crop_pct 0.9 (resize 248), bicubic, ImageNet's mean and std.
PREPROCESSING.update({arch: Preprocessing(224, 248, "bicubic") for arch in TIMM_SETTINGS})

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    **{arch: functools.partial(SwinTransformer, **settings) for arch, settings in SETTINGS.items()},
    **{arch: functools.partial(TimmSwinTransformer, **settings) for arch, settings in TIMM_SETTINGS.items()},
}


# --------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------

_OPTIONS = ("patch_size", "embed_dim", "depths", "num_heads", "window_size", "mlp_ratio")


def torch_config(module) -> dict:
    """The size options of a torchvision ``SwinTransformer`` (``patch_size``, ``embed_dim``,
    ``depths``, ``num_heads``, ``window_size``, ``mlp_ratio``); ``{}`` when they are a named model's.
    A timm one: :func:`timm_torch_config`."""
    if type(module).__module__.startswith("timm."):
        return timm_torch_config(module)
    stages = [m for m in module.features if type(m).__name__ == "Sequential" and type(m[0]).__name__.startswith("Swin")]
    conv, attn = module.features[0][0], stages[0][0].attn
    mlp = stages[0][0].mlp
    config = dict(
        patch_size=tuple(int(k) for k in conv.kernel_size),
        embed_dim=int(conv.out_channels),
        depths=tuple(len(s) for s in stages),
        num_heads=tuple(int(s[0].attn.num_heads) for s in stages),
        window_size=tuple(int(w) for w in attn.window_size),
        mlp_ratio=float(mlp[0].out_features / mlp[0].in_features),
    )
    v2 = hasattr(attn, "logit_scale")
    named = [{k: s.get(k, 4.0) for k in _OPTIONS} for s in SETTINGS.values() if s.get("v2", False) == v2]
    return {} if config in named else config


def timm_torch_config(module) -> dict:
    """The size options of a timm ``SwinTransformer`` (those of :func:`torch_config` and
    ``image_size``); ``{}`` when they are a named model's.

    Raises:
      ValueError: one line naming the first timm option this module does not compute (per-stage
        windows, ``always_partition``, a dynamic image size or mask, ``head_dim``, no qkv bias,
        widths that do not double, another MLP ratio per stage, activation, norm eps or global
        pool, a non-square image).
    """
    from torch import nn as tnn

    if type(module).__name__ != "SwinTransformer":
        raise ValueError(f"timm's {type(module).__name__} is not a Swin jaxpull converts: use timm's swin_*")

    def need(ok: bool, what: str, fix: str):
        if not ok:
            raise ValueError(f"this timm Swin has {what}, which jaxpull's Swin does not compute: {fix}")

    need(not module.dynamic_img_size, "a dynamic image size", "build it with strict_img_size=True")
    need(
        module.global_pool == "avg" and isinstance(module.head.fc, tnn.Linear),
        "another global pool or no classifier",
        "use global_pool='avg' and num_classes > 0",
    )
    pe = module.patch_embed
    need(isinstance(pe.norm, tnn.LayerNorm), "no patch-embedding norm", "use timm's default norm_layer")
    (ih, iw), (ph, pw) = tuple(pe.img_size), tuple(pe.patch_size)
    need(ih == iw and ph == pw, f"a non-square image {ih}x{iw} or patch {ph}x{pw}", "use square images and patches")
    windows = getattr(module, "_ref_window_sizes", None)
    if windows is None:  # timm before per-stage windows: the first block's window of the first stage
        windows = [tuple(module.layers[0].blocks[0].attn.window_size)]
    need(len(set(map(tuple, windows))) == 1, f"per-stage windows {list(windows)}", "use one window_size for all stages")
    window = tuple(int(w) for w in windows[0])
    dims, ratios = [], set()
    for i, stage in enumerate(module.layers):
        need(isinstance(stage.downsample, tnn.Identity) == (i == 0), "another downsampling", "use timm's stages")
        for blk in stage.blocks:
            dim = blk.norm1.normalized_shape[0]
            need(
                not blk.always_partition and not blk.dynamic_mask, "always_partition or dynamic_mask", "leave them off"
            )
            a = blk.attn
            need(
                a.qkv.out_features == 3 * dim and a.qkv.bias is not None, "head_dim or no qkv bias", "use the defaults"
            )
            need(
                type(blk.mlp.act) is tnn.GELU and blk.mlp.act.approximate == "none", "another activation", "use nn.GELU"
            )
            ratios.add(blk.mlp.fc1.out_features / dim)
        dims.append(int(stage.blocks[0].norm1.normalized_shape[0]))
    need(all(d == dims[0] * 2**i for i, d in enumerate(dims)), f"widths {dims} that do not double", "use embed_dim")
    need(len(ratios) == 1, f"MLP ratios {sorted(ratios)}", "use one mlp_ratio")
    eps = {m.eps for m in module.modules() if isinstance(m, tnn.LayerNorm)}
    need(eps == {LN_EPS}, f"LayerNorm eps {sorted(eps)}", f"use nn.LayerNorm (eps {LN_EPS})")
    config = dict(
        patch_size=(int(ph), int(pw)),
        embed_dim=dims[0],
        depths=tuple(len(s.blocks) for s in module.layers),
        num_heads=tuple(int(s.blocks[0].attn.num_heads) for s in module.layers),
        window_size=window,
    )
    config["mlp_ratio"] = float(ratios.pop())
    named = [{**s, "mlp_ratio": 4.0} for s in TIMM_SETTINGS.values()]
    if config in named and ih == 224:
        return {}
    return {**config, "image_size": int(ih)}


def _layer_norm(sd, prefix: str) -> dict:
    w, b = sd.get(f"{prefix}.weight"), sd.get(f"{prefix}.bias")
    return {k: v.astype(np.float32) for k, v in (("scale", w), ("bias", b)) if v is not None}


def _attention(sd, prefix: str, v2: bool, index: bool = True) -> dict:
    """``attn``: ``qkv`` split into ``q``, ``k`` (V2: no bias), ``v``; ``proj``; the position bias."""
    w, b = sd.get(f"{prefix}.qkv.weight"), sd.get(f"{prefix}.qkv.bias")
    p = {"proj": sd.dense(f"{prefix}.proj")}
    for i, name in enumerate("qkv"):
        part = {}
        if w is not None:
            part["kernel"] = np.split(w, 3)[i].T.astype(np.float32)
        if b is not None and not (v2 and name == "k"):  # torchvision zeroes V2's key bias in its forward
            part["bias"] = np.split(b, 3)[i].astype(np.float32)
        p[name] = part
    if index:  # torchvision's buffer (a constant of the window size, recomputed here); timm's is not saved
        sd.get(f"{prefix}.relative_position_index")
    if v2:
        sd.get(f"{prefix}.relative_coords_table")  # likewise
        logit_scale = sd.get(f"{prefix}.logit_scale")
        if logit_scale is not None:
            p["logit_scale"] = logit_scale.astype(np.float32)
        p["cpb_mlp_0"] = sd.dense(f"{prefix}.cpb_mlp.0")
        w2 = sd.get(f"{prefix}.cpb_mlp.2.weight")
        p["cpb_mlp_2"] = {} if w2 is None else {"kernel": w2.T.astype(np.float32)}
    else:
        table = sd.get(f"{prefix}.relative_position_bias_table")
        if table is not None:
            p["relative_position_bias_table"] = table.astype(np.float32)
    return p


def _timm_layout(arch: str, sd, **config) -> dict:
    """Map a timm SwinTransformer state_dict onto :class:`TimmSwinTransformer`'s parameter tree."""
    depths = {**TIMM_SETTINGS[arch], **config}["depths"]
    p = {
        "features_0_0": sd.conv_bn("patch_embed.proj", None),
        "features_0_2": _layer_norm(sd, "patch_embed.norm"),
        "norm": _layer_norm(sd, "norm"),
        "head": sd.dense("head.fc"),
    }
    for i, depth in enumerate(depths):
        for j in range(depth):
            pre = f"layers.{i}.blocks.{j}"
            attn = _attention(sd, f"{pre}.attn", False, index=False)
            p[f"features_{2 * i + 1}_{j}"] = {
                "norm1": _layer_norm(sd, f"{pre}.norm1"),
                "norm2": _layer_norm(sd, f"{pre}.norm2"),
                "attn": attn,
                "mlp_0": sd.dense(f"{pre}.mlp.fc1"),
                "mlp_3": sd.dense(f"{pre}.mlp.fc2"),
            }
        if i > 0:
            w = sd.get(f"layers.{i}.downsample.reduction.weight")
            p[f"features_{2 * i}"] = {
                "reduction": {} if w is None else {"kernel": w.T.astype(np.float32)},
                "norm": _layer_norm(sd, f"layers.{i}.downsample.norm"),
            }
    return p


def torch_layout(arch: str, sd, **config) -> dict:
    """Map a torchvision (or timm: ``timm/...``) SwinTransformer state_dict onto this module's parameter tree."""
    if arch.startswith("timm/"):
        return _timm_layout(arch, sd, **config)
    settings = {**SETTINGS[arch], **config}
    v2 = settings.get("v2", False)
    p = {
        "features_0_0": sd.conv_bn("features.0.0", None),
        "features_0_2": _layer_norm(sd, "features.0.2"),
        "norm": _layer_norm(sd, "norm"),
        "head": sd.dense("head"),
    }
    for i, depth in enumerate(settings["depths"]):
        for j in range(depth):
            pre = f"features.{2 * i + 1}.{j}"
            p[f"features_{2 * i + 1}_{j}"] = {
                "norm1": _layer_norm(sd, f"{pre}.norm1"),
                "norm2": _layer_norm(sd, f"{pre}.norm2"),
                "attn": _attention(sd, f"{pre}.attn", v2),
                "mlp_0": sd.dense(f"{pre}.mlp.0"),
                "mlp_3": sd.dense(f"{pre}.mlp.3"),
            }
        if i < len(settings["depths"]) - 1:
            w = sd.get(f"features.{2 * i + 2}.reduction.weight")
            p[f"features_{2 * i + 2}"] = {
                "reduction": {} if w is None else {"kernel": w.T.astype(np.float32)},
                "norm": _layer_norm(sd, f"features.{2 * i + 2}.norm"),
            }
    return p


CLASSIFIER = {a: "head.fc" if a.startswith("timm/") else "head" for a in ARCHITECTURES}  # the logits' layer
# ModelSpec.config options (a model of other sizes: torch_config)
CONFIG_OPTIONS = {
    "patch_size": tuple[int, int],
    "embed_dim": int,
    "depths": tuple[options.COUNT, ...],
    "num_heads": tuple[options.COUNT, ...],
    "window_size": tuple[int, int],
    "mlp_ratio": float,
    "image_size": Annotated[int, options.Range(MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)],  # timm's Swin: a fixed size
}


FAMILY = Family(
    architectures=ARCHITECTURES,
    torch_layout=torch_layout,
    max_pools=False,
    preprocessing=PREPROCESSING,
    torch_config=torch_config,
    classifier=CLASSIFIER,
    config_options=CONFIG_OPTIONS,
    gradcam_layer=None,  # tokens, not a feature map (the paper has no GradCAM layer for its transformer)
)
