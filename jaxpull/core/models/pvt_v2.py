"""timm's Pyramid Vision Transformer v2: timm/pvt_v2_b0 ... timm/pvt_v2_b5 and timm/pvt_v2_b2_li.

Four stages on a shrinking grid of tokens. An overlapping patch embedding (``patch_embed``: a 7x7
convolution of stride 4, padding 3, then LayerNorm) makes the first grid; each later stage
starts with another (``downsample``: 3x3, stride 2, padding 1, LayerNorm). Each stage runs
pre-norm blocks, ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``, and ends with a LayerNorm;
the last grid is averaged and goes through ``head``. Dropout and drop path are the identity
(eval mode).

* Spatial-reduction attention (``attn``): the queries come from every token (``q``); the keys
  and values (``kv``, one linear layer whose first half is the key) from a reduced grid: a
  convolution of kernel = stride = ``sr_ratio`` (``sr``) and a LayerNorm (``norm``); no
  reduction where ``sr_ratio`` is 1 (the last stage). The linear variant (``b2_li``,
  ``linear=True``) reduces every stage the same way instead: adaptive average pooling to 7x7,
  a 1x1 convolution, LayerNorm and GELU. Per head ``softmax(q k^T / sqrt(head_dim)) v``, heads
  concatenated, ``proj``.
* The MLP (``mlp``): ``fc1``, a depthwise 3x3 convolution on the token grid (``dwconv``, with
  bias), GELU, ``fc2``; the linear variant has a ReLU between ``fc1`` and ``dwconv``.

The rules of docs/method.md ("The rules") apply at every such operation: every LayerNorm (the
patch embeddings', the blocks' ``norm1`` / ``norm2``, the attention's ``norm`` of the reduced
keys and values, each stage's ``norm``) is ``rules.layer_norm``, every GELU ``rules.gelu`` (the
MLP's, and the linear variant's in the key/value path), the linear variant's ReLU
``rules.relu``, and each attention layer's rule is ``rules.sr_attention`` (the query and key
in-projections ``q`` and the key half of ``kv`` scaled under ``"tempered"``, their biases not),
its softmax ``rules.sr_attention.probs``. In the paper's presets ``sr_attention`` is
``"value_only"``: the attention weights held constant, so the gradient flows through the values
only, as the paper's code treats timm's ``pvt_v2.Attention``. Every one of these operations is an
``nn.Module`` in timm, so the paper's module swap reaches them all: no operation is ruled here
that the reference leaves plain. The convolutions (the depthwise one included), linear layers,
the adaptive pool, the residual additions and the final average keep their exact derivatives.

Any input size of at least :func:`min_image_size` pixels works (no position embeddings); the
pretrained weights expect 224x224, resized as timm's ``pretrained_cfg`` says (``crop_pct``
0.9: short side 248, bicubic, centre crop 224). Parameter names follow timm's keys
(``stages_0_blocks_1/attn/kv`` is ``stages.0.blocks.1.attn.kv``); ``kv`` stays one layer.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxpull.core.layers import Conv, Dense, LayerNorm, Projection, adaptive_avg_pool
from jaxpull.core.models import options
from jaxpull.core.models.family import Family
from jaxpull.core.preprocessing import Preprocessing
from jaxpull.core.rules import Rules

# timm's norm layers: the blocks' and stages' norms are timm.layers.LayerNorm (eps 1e-6); the patch
# embeddings' and the attention's are torch.nn.LayerNorm (eps 1e-5).
BLOCK_EPS = 1e-6
TORCH_EPS = 1e-5
LINEAR_POOL = 7  # the linear variant's adaptive pooling of the keys and values: 7x7

_B = dict(sr_ratios=(8, 4, 2, 1), mlp_ratios=(8.0, 8.0, 4.0, 4.0), num_heads=(1, 2, 5, 8))
_WIDE = dict(_B, embed_dims=(64, 128, 320, 512))
# timm's pvt_v2_* builders (timm 1.0): depths, widths, heads, spatial reductions, MLP ratios.
SETTINGS: dict[str, dict[str, Any]] = {
    "timm/pvt_v2_b0": dict(_B, depths=(2, 2, 2, 2), embed_dims=(32, 64, 160, 256)),
    "timm/pvt_v2_b1": dict(_WIDE, depths=(2, 2, 2, 2)),
    "timm/pvt_v2_b2": dict(_WIDE, depths=(3, 4, 6, 3)),
    "timm/pvt_v2_b3": dict(_WIDE, depths=(3, 4, 18, 3)),
    "timm/pvt_v2_b4": dict(_WIDE, depths=(3, 8, 27, 3)),
    "timm/pvt_v2_b5": dict(_WIDE, depths=(3, 6, 40, 3), mlp_ratios=(4.0, 4.0, 4.0, 4.0)),
    "timm/pvt_v2_b2_li": dict(_WIDE, depths=(3, 4, 6, 3), linear=True),
}
# The builder options a module of other sizes records (ModelSpec.config), with their defaults.
OPTIONS = dict(
    depths=None, embed_dims=None, num_heads=None, sr_ratios=None, mlp_ratios=None, linear=False, qkv_bias=True
)

# timm's pretrained_cfg of every pvt_v2 weights (read once; the converter reads it again from
# timm and records what it finds): 224x224, crop_pct 0.9 (short side floor(224 / 0.9) = 248),
# bicubic, centre crop; ImageNet's mean and std.
PREPROCESSING = Preprocessing(224, 248, "bicubic")


def grid_sizes(size: int) -> tuple[int, ...]:
    """The token grid's side in each of the four stages for an input side of ``size`` pixels."""
    sizes = [(size + 2 * 3 - 7) // 4 + 1]  # patch_embed: 7x7, stride 4, padding 3
    for _ in range(3):
        sizes.append((sizes[-1] + 2 * 1 - 3) // 2 + 1)  # downsample: 3x3, stride 2, padding 1
    return tuple(sizes)


def min_image_size(sr_ratios: tuple[int, ...], linear: bool = False) -> int:
    """The smallest input side whose every stage has at least ``sr_ratio`` tokens a side (the
    spatial reduction's convolution needs one window; the linear variant pools adaptively)."""
    size = 1
    # strict=False: grid_sizes gives four stages' grids, a model of fewer stages checks its first ones
    while any(g < (1 if linear else r) for g, r in zip(grid_sizes(size), sr_ratios, strict=False)):
        size += 1
    return size


class SpatialReductionAttention(nn.Module):
    """timm's ``pvt_v2.Attention`` on a token grid ``(N, H, W, C)`` -> same shape.

    Queries from every token; keys and values from the grid reduced by ``sr`` (kernel = stride =
    ``sr_ratio``) and ``norm``, or, ``linear``, by 7x7 adaptive average pooling, ``sr`` (1x1),
    ``norm`` and GELU; the rule of the attention through ``rules.sr_attention``.
    """

    num_heads: int
    sr_ratio: int
    linear: bool = False
    qkv_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        n, h, w, c = x.shape
        heads, head_dim = self.num_heads, c // self.num_heads
        q, q_bias = Projection(c, use_bias=self.qkv_bias, name="q")(x.reshape(n, h * w, c))
        if self.linear:
            reduced = Conv(c, 1, use_bias=True, name="sr")(adaptive_avg_pool(x, (LINEAR_POOL, LINEAR_POOL)))
            reduced = rules.gelu(LayerNorm(TORCH_EPS, name="norm")(reduced, rules))
        elif self.sr_ratio > 1:
            reduced = Conv(c, self.sr_ratio, self.sr_ratio, use_bias=True, name="sr")(x)
            reduced = LayerNorm(TORCH_EPS, name="norm")(reduced, rules)
        else:
            reduced = x
        kv, kv_bias = Projection(2 * c, use_bias=self.qkv_bias, name="kv")(reduced.reshape(n, -1, c))
        k, v = kv[..., :c], kv[..., c:]  # timm: kv.reshape(N, M, 2, heads, head_dim), key first
        k_bias = None if kv_bias is None else kv_bias[:c]
        if kv_bias is not None:
            v = v + kv_bias[c:]

        def split(a: jax.Array) -> jax.Array:  # (N, L, C) -> (N, heads, L, C / heads)
            return a.reshape(n, -1, heads, head_dim).transpose(0, 2, 1, 3)

        def core(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
            scores = jnp.einsum("nhqd,nhkd->nhqk", split(q), split(k)) / np.sqrt(head_dim)
            probs = rules.sr_attention.probs(scores)
            return jnp.einsum("nhqk,nhkd->nhqd", probs, split(v)).transpose(0, 2, 1, 3).reshape(n, h * w, c)

        out = rules.sr_attention(core, q, k, v, q_bias, k_bias)
        return Dense(c, name="proj")(out).reshape(n, h, w, c)


class MlpWithDepthwiseConv(nn.Module):
    """timm's ``MlpWithDepthwiseConv`` on ``(N, H, W, C)``: ``fc1``, (ReLU: ``extra_relu``), the
    depthwise 3x3 ``dwconv``, GELU, ``fc2``."""

    hidden: int
    extra_relu: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        y = Dense(self.hidden, name="fc1")(x)
        if self.extra_relu:
            y = rules.relu(y)
        y = Conv(self.hidden, 3, 1, 1, groups=self.hidden, use_bias=True, name="dwconv")(y)
        return Dense(x.shape[-1], name="fc2")(rules.gelu(y))


class Block(nn.Module):
    """``x + attn(norm1(x))``, then ``x + mlp(norm2(x))`` on ``(N, H, W, C)``."""

    num_heads: int
    sr_ratio: int
    mlp_ratio: float
    linear: bool = False
    qkv_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        attn = SpatialReductionAttention(self.num_heads, self.sr_ratio, self.linear, self.qkv_bias, name="attn")
        x = x + attn(LayerNorm(BLOCK_EPS, name="norm1")(x, rules), rules)
        mlp = MlpWithDepthwiseConv(int(x.shape[-1] * self.mlp_ratio), extra_relu=self.linear, name="mlp")
        return x + mlp(LayerNorm(BLOCK_EPS, name="norm2")(x, rules), rules)


class OverlapPatchEmbed(nn.Module):
    """A ``patch_size`` x ``patch_size`` convolution (``proj``) of ``stride``, padding half the patch,
    then ``norm``: ``(N, H, W, C_in)`` -> ``(N, H', W', features)``."""

    features: int
    patch_size: int
    stride: int

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        x = Conv(self.features, self.patch_size, self.stride, self.patch_size // 2, use_bias=True, name="proj")(x)
        return LayerNorm(TORCH_EPS, name="norm")(x, rules)


class PyramidVisionTransformerV2(nn.Module):
    """timm ``PyramidVisionTransformerV2`` (global average pooling): ``(N, H, W, 3)`` normalised
    images, H and W at least :func:`min_image_size` -> logits ``(N, num_classes)``."""

    depths: tuple[int, ...]
    embed_dims: tuple[int, ...]
    num_heads: tuple[int, ...]
    sr_ratios: tuple[int, ...] = (8, 4, 2, 1)
    mlp_ratios: tuple[float, ...] = (8.0, 8.0, 4.0, 4.0)
    linear: bool = False
    qkv_bias: bool = True
    num_classes: int = 1000

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        smallest = min_image_size(self.sr_ratios, self.linear)
        if min(x.shape[1:3]) < smallest:
            raise ValueError(
                f"a {x.shape[1]}x{x.shape[2]} image is too small for this PVT-v2 (a stage's spatial reduction "
                f"needs more tokens): use images of at least {smallest}x{smallest} pixels (its weights expect 224x224)"
            )
        x = OverlapPatchEmbed(self.embed_dims[0], 7, 4, name="patch_embed")(x, rules)
        for i, depth in enumerate(self.depths):
            if i > 0:
                x = OverlapPatchEmbed(self.embed_dims[i], 3, 2, name=f"stages_{i}_downsample")(x, rules)
            for j in range(depth):
                block = Block(
                    self.num_heads[i],
                    self.sr_ratios[i],
                    self.mlp_ratios[i],
                    self.linear,
                    self.qkv_bias,
                    name=f"stages_{i}_blocks_{j}",
                )
                x = block(x, rules)
            x = LayerNorm(BLOCK_EPS, name=f"stages_{i}_norm")(x, rules)
        return Dense(self.num_classes, name="head")(jnp.mean(x, axis=(1, 2)))


ARCHITECTURES = {arch: functools.partial(PyramidVisionTransformerV2, **s) for arch, s in SETTINGS.items()}


# --------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------


def torch_config(module) -> dict:
    """The builder options of a timm ``PyramidVisionTransformerV2`` beyond a named architecture's:
    ``{}`` for a module of a named architecture's sizes (timm's ``pvt_v2_*()``), else every size
    option (``depths``, ``embed_dims``, ``num_heads``, ``sr_ratios``, ``mlp_ratios``, ``linear``,
    ``qkv_bias``), whichever name it is converted under.

    Raises:
      ValueError: options this port does not have: ``global_pool`` other than ``"avg"``, no
        classifier (``num_classes=0``), ``in_chans`` other than 3, other LayerNorm epsilons
        (``norm_layer``), another activation than exact GELU.
    """
    if getattr(module, "global_pool", "avg") != "avg":
        raise ValueError(
            f"this PVT-v2 was built with global_pool={module.global_pool!r}: jaxpull's PVT-v2 averages the last "
            "grid (global_pool='avg', timm's default)"
        )
    if not hasattr(module.head, "weight"):
        raise ValueError("this PVT-v2 has no classifier (num_classes=0): jaxpull explains a classifier's logits")
    if module.in_chans != 3:
        raise ValueError(f"this PVT-v2 takes {module.in_chans} input channels (in_chans): jaxpull explains RGB images")
    blocks = [s.blocks[0] for s in module.stages]
    attn = [b.attn for b in blocks]
    eps = {m.eps for s in module.stages for m in (s.norm, s.blocks[0].norm1, s.blocks[0].norm2)}
    if eps != {BLOCK_EPS}:
        raise ValueError(
            f"this PVT-v2's block LayerNorms have eps {sorted(eps)}, jaxpull's PVT-v2 {BLOCK_EPS} (timm's default norm_layer)"
        )
    acts = {(type(b.mlp.act).__name__, getattr(b.mlp.act, "approximate", "")) for b in blocks}
    if acts != {("GELU", "none")}:
        raise ValueError(f"this PVT-v2's MLP activation is {sorted(acts)}: jaxpull's PVT-v2 has timm's exact GELU")
    linear = attn[0].pool is not None
    config = dict(
        depths=tuple(len(s.blocks) for s in module.stages),
        embed_dims=tuple(int(a.dim) for a in attn),
        num_heads=tuple(int(a.num_heads) for a in attn),
        sr_ratios=tuple(1 if a.sr is None or linear else int(a.sr.kernel_size[0]) for a in attn),
        mlp_ratios=tuple(b.mlp.fc1.out_features / b.mlp.fc1.in_features for b in blocks),
        linear=linear,
        qkv_bias=attn[0].q.bias is not None,
    )
    named = [{k: s.get(k, OPTIONS[k]) for k in OPTIONS} for s in SETTINGS.values()]
    if linear:  # timm ignores sr_ratios in the linear variant
        named = [dict(n, sr_ratios=config["sr_ratios"]) for n in named]
    return {} if config in named else config


def _layer_norm(sd, prefix: str) -> dict:
    w, b = sd.get(f"{prefix}.weight"), sd.get(f"{prefix}.bias")
    return {k: v.astype(np.float32) for k, v in (("scale", w), ("bias", b)) if v is not None}


def _linear(sd, prefix: str, bias: bool = True) -> dict:
    """A ``torch.nn.Linear`` (kernel (out, in) -> (in, out)); its bias only where ``bias``."""
    if bias:
        return sd.dense(prefix)
    w = sd.get(f"{prefix}.weight")
    return {} if w is None else {"kernel": w.T.astype(np.float32)}


def _patch_embed(sd, prefix: str) -> dict:
    return {"proj": sd.conv_bn(f"{prefix}.proj", None), "norm": _layer_norm(sd, f"{prefix}.norm")}


def torch_layout(arch: str, sd, **config) -> dict:
    """Map a timm ``PyramidVisionTransformerV2`` state_dict onto this module's parameter tree
    (``config``: its size options, see :func:`torch_config`)."""
    s = {**OPTIONS, **SETTINGS[arch], **config}
    p = {"patch_embed": _patch_embed(sd, "patch_embed"), "head": sd.dense("head")}
    for i, depth in enumerate(s["depths"]):
        if i > 0:
            p[f"stages_{i}_downsample"] = _patch_embed(sd, f"stages.{i}.downsample")
        for j in range(depth):
            pre = f"stages.{i}.blocks.{j}"
            attn = {
                "q": _linear(sd, f"{pre}.attn.q", s["qkv_bias"]),
                "kv": _linear(sd, f"{pre}.attn.kv", s["qkv_bias"]),
                "proj": sd.dense(f"{pre}.attn.proj"),
            }
            if s["linear"] or s["sr_ratios"][i] > 1:
                attn["sr"] = sd.conv_bn(f"{pre}.attn.sr", None)
                attn["norm"] = _layer_norm(sd, f"{pre}.attn.norm")
            p[f"stages_{i}_blocks_{j}"] = {
                "norm1": _layer_norm(sd, f"{pre}.norm1"),
                "attn": attn,
                "norm2": _layer_norm(sd, f"{pre}.norm2"),
                "mlp": {
                    "fc1": sd.dense(f"{pre}.mlp.fc1"),
                    "dwconv": sd.conv_bn(f"{pre}.mlp.dwconv", None),
                    "fc2": sd.dense(f"{pre}.mlp.fc2"),
                },
            }
        p[f"stages_{i}_norm"] = _layer_norm(sd, f"stages.{i}.norm")
    return p


def state_dict_config(arch: str, tensors: Mapping[str, np.ndarray], metadata: Mapping | None = None) -> dict | None:
    """``{"qkv_bias": False}`` for a state_dict of a PVT-v2 built without the query / key-value
    biases (timm's ``qkv_bias=False``), else ``{}``: every other size is the named architecture's."""
    q = [k for k in tensors if k.endswith(".attn.q.weight")]
    return {"qkv_bias": False} if q and not any(k.endswith(".attn.q.bias") for k in tensors) else {}


CLASSIFIER = "head"  # the logits' layer in the state_dict: the number of classes is its weight's rows
# ModelSpec.config: the options of a module of other sizes (torch_config) or without qkv biases (state_dict_config)
CONFIG_OPTIONS = {
    "depths": tuple[options.COUNT, ...],
    "embed_dims": tuple[int, ...],
    "num_heads": tuple[options.COUNT, ...],
    "sr_ratios": tuple[int, ...],
    "mlp_ratios": tuple[float, ...],
    "linear": bool,
    "qkv_bias": bool,
}


FAMILY = Family(
    architectures=ARCHITECTURES,
    torch_layout=torch_layout,
    max_pools=False,
    classifier=CLASSIFIER,
    preprocessing=PREPROCESSING,
    torch_config=torch_config,
    state_dict_config=state_dict_config,
    config_options=CONFIG_OPTIONS,
)
