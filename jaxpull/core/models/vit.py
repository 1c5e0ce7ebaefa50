"""Vision Transformers: torchvision's vit_b_16, vit_b_32, vit_l_16, vit_l_32, vit_h_14; timm's
``timm/vit_{tiny,small,base,large}_patch16_224`` and DeiT ``timm/deit_{tiny,small,base}_patch16_224``
with the distilled ``timm/deit_{tiny,small,base}_distilled_patch16_224``.

The image is cut into patches (``conv_proj``, a convolution with kernel = stride = patch size),
a class token is prepended, the position embedding added, and ``num_layers`` pre-norm encoder
blocks run: ``x + attention(ln_1(x))``, then ``x + mlp(ln_2(x))`` (Linear -> GELU -> Linear);
a final LayerNorm, and the class token's features go through ``heads`` (``head``, or
``pre_logits`` -> tanh -> ``head`` when ``representation_size`` is set). Dropout is the identity
(eval mode).

The rules of docs/method.md ("The rules") apply at every such operation, through
``jaxpull.core.gates``: every LayerNorm (``ln_1``, ``ln_2``, the encoder's ``ln``) is
``rules.layer_norm``, the MLP's GELU ``rules.gelu``, and each self-attention layer's rule is
``rules.attention`` (the query and key in-projections scaled, their biases not, as the
reference scales the inputs of ``nn.MultiheadAttention``), its softmax ``rules.attention.probs``.
Every one of these is an ``nn.Module`` in torchvision's ViT, so the reference's module swap
reaches them all: no operation is gated here that the reference leaves plain. The tanh of
``pre_logits`` keeps its plain derivative (docs/method.md).

The position embeddings fix the input size: a model takes ``image_size`` x ``image_size``
images only (224 for torchvision's builders without weights; torchvision's vit_h_14 DEFAULT
weights, SWAG E2E, are 518 px, vit_b_16's and vit_l_16's SWAG E2E weights 384 and 512 px: a
model of those weights needs ``image_size`` in its ``ModelSpec.config``: ``torch_config`` reads
it off a torch module, ``state_dict_config`` off a state_dict; the converter's ``--weights`` /
``--state-dict`` path does not call the latter yet). Parameter names follow torchvision's
(``encoder/encoder_layer_0/self_attention/...``); ``nn.MultiheadAttention``'s fused
``in_proj_weight`` is split into ``query``, ``key`` and ``value`` projections.

timm's ``VisionTransformer`` with its defaults (``global_pool="token"``, a class token, learned
position embeddings added after the class token is prepended, pre-norm blocks without layer
scale, LayerNorm eps 1e-6, exact GELU, the final ``norm`` and no ``fc_norm``) computes the same
function, so it is the same module with another key layout: ``patch_embed.proj`` -> ``conv_proj``,
``cls_token`` -> ``class_token``, ``pos_embed`` -> ``encoder/pos_embedding``, ``blocks.i.norm1`` /
``norm2`` -> ``ln_1`` / ``ln_2``, ``blocks.i.attn.qkv`` (fused: q, k, v in thirds, heads
contiguous in each, as ``in_proj_weight``) -> ``query`` / ``key`` / ``value``, ``attn.proj`` ->
``out_proj``, ``mlp.fc1`` / ``fc2`` -> ``linear_1`` / ``linear_2``, ``norm`` -> ``encoder/ln``,
``head`` -> ``head``. timm scales q by ``head_dim ** -0.5`` before the product where
torchvision divides the scores by ``sqrt(head_dim)``: the same up to float rounding. The attention
rule is the same ``rules.attention`` (q and k in-projections scaled, their biases not).
DeiT's distilled models (timm's ``VisionTransformerDistilled``) add a distillation token after
the class token (``dist_token``, position-embedded with it) and a second head ``head_dist`` on it;
in eval mode timm returns the mean of the two heads' logits, and so does this module
(``distilled=True``). Options timm has and this module does not compute (another
``global_pool``, register tokens, ``no_embed_class``, a dynamic image size, layer scale, qk
norm, pre-norm, ...) are refused by ``torch_config`` with a one-line error naming them.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
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

LN_EPS = 1e-6  # torchvision's norm_layer: partial(nn.LayerNorm, eps=1e-6)
DEFAULT_IMAGE_SIZE = 224  # torchvision's _vision_transformer without weights

# torchvision's vit_* builders: patch size, depth, heads, width, MLP width.
SETTINGS: dict[str, dict[str, Any]] = {
    "vit_b_16": dict(patch_size=16, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072),
    "vit_b_32": dict(patch_size=32, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072),
    "vit_l_16": dict(patch_size=16, num_layers=24, num_heads=16, hidden_dim=1024, mlp_dim=4096),
    "vit_l_32": dict(patch_size=32, num_layers=24, num_heads=16, hidden_dim=1024, mlp_dim=4096),
    "vit_h_14": dict(patch_size=14, num_layers=32, num_heads=16, hidden_dim=1280, mlp_dim=5120),
}

# torchvision 0.29's DEFAULT weights' transforms() (read once):
# ViT_B_16 / B_32 / L_32 IMAGENET1K_V1: crop 224, resize 256, bilinear; ViT_L_16 IMAGENET1K_V1:
# crop 224, resize 242, bilinear; ViT_H_14 DEFAULT = IMAGENET1K_SWAG_E2E_V1: 518 / 518, bicubic
# (those weights are for image_size 518; the other weights, not DEFAULT: SWAG E2E of B_16 384 /
# 384 and of L_16 512 / 512, bicubic; SWAG LINEAR 224 / 224, bicubic).
PREPROCESSING = {
    "vit_b_16": Preprocessing(224, 256, "bilinear"),
    "vit_b_32": Preprocessing(224, 256, "bilinear"),
    "vit_l_16": Preprocessing(224, 242, "bilinear"),
    "vit_l_32": Preprocessing(224, 256, "bilinear"),
    "vit_h_14": Preprocessing(518, 518, "bicubic"),
}

# timm's vit_* and deit_* builders (timm 1.0.31): the same sizes as SETTINGS' (mlp_ratio 4).
_TIMM_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(patch_size=16, num_layers=12, num_heads=3, hidden_dim=192, mlp_dim=768),
    "small": dict(patch_size=16, num_layers=12, num_heads=6, hidden_dim=384, mlp_dim=1536),
    "base": dict(patch_size=16, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072),
    "large": dict(patch_size=16, num_layers=24, num_heads=16, hidden_dim=1024, mlp_dim=4096),
}
TIMM_SETTINGS = {
    **{f"timm/vit_{size}_patch16_224": _TIMM_SIZES[size] for size in ("tiny", "small", "base", "large")},
    **{f"timm/deit_{size}_patch16_224": _TIMM_SIZES[size] for size in ("tiny", "small", "base")},
}
TIMM_DISTILLED = {f"timm/deit_{size}_distilled_patch16_224": _TIMM_SIZES[size] for size in ("tiny", "small", "base")}
# The pretrained_cfg of each name's default weights (timm 1.0.31, read once): input 224, crop_pct
# 0.9 (resize floor(224 / 0.9) = 248), bicubic; the AugReg ViTs (vit_*: augreg(2)_in21k_ft_in1k)
# take mean = std = 0.5, DeiT (fb_in1k) ImageNet's.
TIMM_PREPROCESSING = {arch: Preprocessing(224, 248, "bicubic") for arch in {**TIMM_SETTINGS, **TIMM_DISTILLED}}
INPUT_NORMALIZATION = {arch: ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)) for arch in TIMM_SETTINGS if "/vit_" in arch}


class SelfAttention(nn.Module):
    """``nn.MultiheadAttention(hidden_dim, num_heads, batch_first=True)`` on ``(x, x, x)``, no mask.

    ``(N, L, E)`` -> ``(N, L, E)``: per head softmax(q k^T / sqrt(E / heads)) v, heads concatenated,
    ``out_proj``; the attention rule through ``rules.attention``.
    """

    num_heads: int

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        n, length, e = x.shape
        head_dim = e // self.num_heads
        (q, q_bias), (k, k_bias) = Projection(e, name="query")(x), Projection(e, name="key")(x)
        v = Dense(e, name="value")(x)

        # heads first, explicitly: on einsum's (N, L, heads, E / heads) operands XLA:CPU ran this core
        # 2.5x slower forward (358 vs 145 ms) and 1.5x forward + backward (492 vs 319 ms) at ViT-B/16's
        # shapes, batch 50
        def heads(a: jax.Array) -> jax.Array:  # (N, L, E) -> (N, heads, L, E / heads)
            return a.reshape(n, length, self.num_heads, head_dim).transpose(0, 2, 1, 3)

        def core(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
            scores = jnp.einsum("nhqd,nhkd->nhqk", heads(q), heads(k)) / np.sqrt(head_dim)
            probs = rules.attention.probs(scores)
            return jnp.einsum("nhqk,nhkd->nhqd", probs, heads(v)).transpose(0, 2, 1, 3).reshape(n, length, e)

        out = rules.attention(core, q, k, v, q_bias, k_bias)
        return Dense(e, name="out_proj")(out)


class MLPBlock(nn.Module):
    """torchvision's ``MLPBlock``: Linear (``linear_1``) -> GELU -> Linear (``linear_2``)."""

    mlp_dim: int

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        y = rules.gelu(Dense(self.mlp_dim, name="linear_1")(x))
        return Dense(x.shape[-1], name="linear_2")(y)


class EncoderBlock(nn.Module):
    """``x + self_attention(ln_1(x))``, then ``x + mlp(ln_2(x))`` on ``(N, L, E)``."""

    num_heads: int
    mlp_dim: int

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        x = x + SelfAttention(self.num_heads, name="self_attention")(LayerNorm(LN_EPS, name="ln_1")(x, rules), rules)
        return x + MLPBlock(self.mlp_dim, name="mlp")(LayerNorm(LN_EPS, name="ln_2")(x, rules), rules)


class Encoder(nn.Module):
    """Add ``pos_embedding`` ``(1, L, E)``, run ``encoder_layer_0 ...``, then ``ln``."""

    num_layers: int
    num_heads: int
    mlp_dim: int

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1,) + x.shape[1:])
        for i in range(self.num_layers):
            x = EncoderBlock(self.num_heads, self.mlp_dim, name=f"encoder_layer_{i}")(x, rules)
        return LayerNorm(LN_EPS, name="ln")(x, rules)


class VisionTransformer(nn.Module):
    """torchvision ``VisionTransformer`` (no convolutional stem): ``(N, S, S, 3)`` -> logits, S = image_size."""

    patch_size: int
    num_layers: int
    num_heads: int
    hidden_dim: int
    mlp_dim: int
    image_size: int = DEFAULT_IMAGE_SIZE
    num_classes: int = 1000
    representation_size: int | None = None
    distilled: bool = False  # DeiT's distillation token and second head (timm's VisionTransformerDistilled)

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        s, p = self.image_size, self.patch_size
        if s % p:
            raise ValueError(f"image_size {s} is not a multiple of patch_size {p}: use a multiple of {p}")
        if x.shape[1:3] != (s, s):
            raise ValueError(
                f"this ViT takes {s}x{s} images (its position embeddings fix the input size), "
                f"got {x.shape[1]}x{x.shape[2]}: resize the images to {s}x{s}"
            )
        n = x.shape[0]
        x = Conv(self.hidden_dim, p, p, use_bias=True, name="conv_proj")(x)
        x = x.reshape(n, -1, self.hidden_dim)  # (N, (S / p)^2, E), patches in row-major order as torch's
        tokens = [self.param("class_token", nn.initializers.zeros, (1, 1, self.hidden_dim))]
        if self.distilled:
            tokens.append(self.param("dist_token", nn.initializers.zeros, (1, 1, self.hidden_dim)))
        tokens = [jnp.broadcast_to(t, (n, 1, self.hidden_dim)).astype(x.dtype) for t in tokens]
        x = jnp.concatenate([*tokens, x], axis=1)
        x = Encoder(self.num_layers, self.num_heads, self.mlp_dim, name="encoder")(x, rules)
        if self.distilled:  # timm's eval mode: the mean of the class and distillation heads
            head, head_dist = Dense(self.num_classes, name="head"), Dense(self.num_classes, name="head_dist")
            return (head(x[:, 0]) + head_dist(x[:, 1])) / 2
        x = x[:, 0]
        if self.representation_size is not None:
            x = jnp.tanh(Dense(self.representation_size, name="pre_logits")(x))
        return Dense(self.num_classes, name="head")(x)


ARCHITECTURES = {
    **{arch: functools.partial(VisionTransformer, **s) for arch, s in SETTINGS.items()},
    **{arch: functools.partial(VisionTransformer, **s) for arch, s in TIMM_SETTINGS.items()},
    **{arch: functools.partial(VisionTransformer, **s, distilled=True) for arch, s in TIMM_DISTILLED.items()},
}

SIZE_OPTIONS = ("patch_size", "num_layers", "num_heads", "hidden_dim", "mlp_dim")


def torch_config(module) -> dict:
    """The builder options of a torchvision ``VisionTransformer`` beyond a named architecture's.

    A module with a named architecture's layer sizes gives only what differs from its builder:
    ``image_size`` (when not 224) and ``representation_size`` (when set), so ``{}`` for
    torchvision's ``vit_*()``; a module of other layer sizes (the tests' small ViTs) gives every
    size option too, whichever name it is converted under.

    A timm ``VisionTransformer`` / ``VisionTransformerDistilled``: see :func:`timm_torch_config`.

    Raises:
      ValueError: a convolutional stem (``conv_stem_configs``) or LayerNorm epsilon other than
        1e-6, which this port does not have.
    """
    if type(module).__module__.startswith("timm."):
        return timm_torch_config(module)
    if not hasattr(module.conv_proj, "weight"):
        raise ValueError(
            "ViTs with a convolutional stem (conv_stem_configs) are not supported: "
            "use torchvision's patch embedding (conv_stem_configs=None)"
        )
    if module.encoder.ln.eps != LN_EPS:
        raise ValueError(
            f"this ViT's LayerNorm eps is {module.encoder.ln.eps}, jaxpull's ViT has {LN_EPS}: "
            "build it with torchvision's default norm_layer"
        )
    sizes = dict(
        patch_size=module.patch_size,
        num_layers=len(module.encoder.layers),
        num_heads=module.encoder.layers[0].num_heads,
        hidden_dim=module.hidden_dim,
        mlp_dim=module.mlp_dim,
    )
    config = {} if sizes in SETTINGS.values() else sizes
    if module.image_size != DEFAULT_IMAGE_SIZE:
        config["image_size"] = module.image_size
    if module.representation_size is not None:
        config["representation_size"] = module.representation_size
    return config


def timm_torch_config(module) -> dict:
    """The builder options of a timm ``VisionTransformer`` (or DeiT's ``VisionTransformerDistilled``)
    beyond a named model's: ``image_size`` when not 224, and every size option for a module of
    other sizes than the named models' (the tests' small ones). Whether it is distilled is its
    name's (``timm/deit_*_distilled_*``), not an option.

    Raises:
      ValueError: one line naming the first timm option this module does not compute (a
        ``global_pool`` other than ``"token"``, register tokens, ``no_embed_class``, a dynamic
        image size or padding, layer scale, qk norm, pre-norm, ``fc_norm``, attention pooling,
        biases off, another block, attention, MLP, activation, LayerNorm eps, or a non-square
        image or patch).
    """
    from torch import nn as tnn

    kind = type(module).__name__
    if kind not in ("VisionTransformer", "VisionTransformerDistilled"):
        raise ValueError(f"timm's {kind} is not a ViT jaxpull converts: use a timm VisionTransformer (vit_*, deit_*)")

    def need(ok: bool, what: str, fix: str):
        if not ok:
            raise ValueError(f"this timm ViT has {what}, which jaxpull's ViT does not compute: {fix}")

    need(module.global_pool == "token", f"global_pool={module.global_pool!r}", "use global_pool='token'")
    need(module.cls_token is not None, "no class token", "build it with class_token=True")
    need(getattr(module, "reg_token", None) is None, "register tokens", "build it with reg_tokens=0")
    need(not module.no_embed_class, "no_embed_class=True", "use a model with no_embed_class=False")
    need(module.pos_embed is not None, "no position embedding", "build it with pos_embed='learn'")
    need(not module.dynamic_img_size, "a dynamic image size", "build it with dynamic_img_size=False")
    pe = module.patch_embed
    need(not getattr(pe, "dynamic_img_pad", False), "dynamic image padding", "build it with dynamic_img_pad=False")
    need(
        type(pe).__name__ == "PatchEmbed" and isinstance(pe.norm, tnn.Identity),
        "a patch-embedding norm or another patch embedding",
        "use timm's PatchEmbed without norm",
    )
    need(pe.proj.bias is not None, "no patch-embedding bias", "build it with pre_norm=False")
    need(isinstance(module.norm_pre, tnn.Identity), "pre-norm (norm_pre)", "build it with pre_norm=False")
    need(isinstance(module.fc_norm, tnn.Identity), "fc_norm", "build it with fc_norm=False")
    need(getattr(module, "attn_pool", None) is None, "attention pooling", "use global_pool='token'")
    need(isinstance(module.head, tnn.Linear), "no linear head", "build it with num_classes > 0")
    need(isinstance(module.norm, tnn.LayerNorm), "no final norm", "build it with final_norm=True")
    from timm.layers import Attention, Mlp
    from timm.models.vision_transformer import Block

    for b in module.blocks:
        need(type(b) is Block, f"{type(b).__name__} blocks", "use timm's Block")
        need(
            isinstance(b.ls1, tnn.Identity) and isinstance(b.ls2, tnn.Identity),
            "layer scale (init_values)",
            "use a model without layer scale",
        )
        a = b.attn
        need(type(a) is Attention, f"{type(a).__name__} attention", "use timm's Attention")
        need(
            isinstance(a.q_norm, tnn.Identity) and isinstance(a.k_norm, tnn.Identity),
            "qk norm",
            "build it with qk_norm=False",
        )
        need(
            isinstance(a.norm, tnn.Identity) and getattr(a, "gate", None) is None,
            "an attention-output norm or gate",
            "build it with scale_attn_norm=False",
        )
        need(
            a.qkv.bias is not None and a.proj.bias is not None,
            "attention projections without bias",
            "build it with qkv_bias=True, proj_bias=True",
        )
        need(
            a.head_dim * a.num_heads == b.norm1.normalized_shape[0],
            "an attention width other than the embedding width",
            "leave attn_head_dim unset",
        )
        need(type(b.mlp) is Mlp and isinstance(b.mlp.norm, tnn.Identity), "another MLP", "use timm's Mlp without norm")
        need(
            type(b.mlp.act) is tnn.GELU and b.mlp.act.approximate == "none",
            f"activation {b.mlp.act}",
            "use act_layer=nn.GELU (exact)",
        )
        need(
            b.mlp.fc1.bias is not None and b.mlp.fc2.bias is not None,
            "MLP layers without bias",
            "build it with proj_bias=True",
        )
    eps = {m.eps for m in module.modules() if isinstance(m, tnn.LayerNorm)}
    need(eps == {LN_EPS}, f"LayerNorm eps {sorted(eps)}", f"use timm's default norm_layer (eps {LN_EPS})")
    (ph, pw), (ih, iw) = tuple(pe.patch_size), tuple(pe.img_size)
    need(ph == pw and ih == iw, f"a non-square patch {ph}x{pw} or image {ih}x{iw}", "use square patches and images")
    need(ih % ph == 0, f"an image size {ih} not a multiple of the patch size {ph}", "use a multiple of the patch size")
    block = module.blocks[0]
    sizes = dict(
        patch_size=int(ph),
        num_layers=len(module.blocks),
        num_heads=int(block.attn.num_heads),
        hidden_dim=int(module.embed_dim),
        mlp_dim=int(block.mlp.fc1.out_features),
    )
    config = {} if sizes in _TIMM_SIZES.values() else sizes
    if ih != DEFAULT_IMAGE_SIZE:
        config["image_size"] = int(ih)
    return config


def state_dict_config(arch: str, tensors: Mapping[str, np.ndarray], metadata: Mapping | None = None) -> dict:
    """The builder options a state_dict of ``arch``'s layer sizes fixes beyond them: ``image_size``
    (from the position embeddings' length, when not 224) and ``representation_size``
    (``heads.pre_logits``). E.g. ``{"image_size": 518}`` for vit_h_14's DEFAULT (SWAG E2E) weights.
    ``metadata`` (torch's module versions) plays no part.

    Raises:
      ValueError: the position embeddings are not those of a square grid of patches plus the
        class token.
    """
    if arch.startswith("timm/"):
        return _timm_state_dict_config(arch, tensors)
    config = {}
    p = (
        int(np.shape(tensors["conv_proj.weight"])[-1])
        if "conv_proj.weight" in tensors
        else SETTINGS[arch]["patch_size"]
    )
    if "encoder.pos_embedding" in tensors:
        patches = int(np.shape(tensors["encoder.pos_embedding"])[1]) - 1
        side = int(round(patches**0.5))
        if side * side != patches:
            raise ValueError(
                f"encoder.pos_embedding has {patches + 1} positions, not a square grid of patches "
                "plus the class token: is this a torchvision ViT state_dict?"
            )
        if side * p != DEFAULT_IMAGE_SIZE:
            config["image_size"] = side * p
    if "heads.pre_logits.weight" in tensors:
        config["representation_size"] = int(np.shape(tensors["heads.pre_logits.weight"])[0])
    return config


def _timm_state_dict_config(arch: str, tensors: Mapping[str, np.ndarray]) -> dict:
    """``image_size`` from a timm ViT state_dict's ``pos_embed`` (its class token, and DeiT's
    distillation token, included), when not 224."""
    if "pos_embed" not in tensors:
        return {}
    sizes = {**TIMM_SETTINGS, **TIMM_DISTILLED}[arch]
    p = (
        int(np.shape(tensors["patch_embed.proj.weight"])[-1])
        if "patch_embed.proj.weight" in tensors
        else sizes["patch_size"]
    )
    tokens = 2 if arch in TIMM_DISTILLED else 1
    patches = int(np.shape(tensors["pos_embed"])[1]) - tokens
    side = int(round(max(patches, 0) ** 0.5))
    if side * side != patches or patches == 0:
        raise ValueError(
            f"pos_embed has {patches + tokens} positions, not a square grid of patches plus {tokens} token(s): "
            f"is this a timm {arch[5:]} state_dict?"
        )
    return {"image_size": side * p} if side * p != DEFAULT_IMAGE_SIZE else {}


# torchvision before 0.14 named the MLP's linear layers mlp.linear_1 / linear_2 (now mlp.0 / mlp.3).
LEGACY_MLP_KEY = r"^(encoder\.layers\.encoder_layer_\d+\.mlp)\.linear_([12])\.(weight|bias)$"


def _layer_norm(sd, prefix: str) -> dict:
    w, b = sd.get(f"{prefix}.weight"), sd.get(f"{prefix}.bias")
    return {k: v.astype(np.float32) for k, v in (("scale", w), ("bias", b)) if v is not None}


def _self_attention(sd, prefix: str) -> dict:
    """``nn.MultiheadAttention``'s fused ``in_proj`` (3E, E) split into query, key, value Dense layers."""
    w, b = sd.get(f"{prefix}.in_proj_weight"), sd.get(f"{prefix}.in_proj_bias")
    p = {"out_proj": sd.dense(f"{prefix}.out_proj")}
    for i, name in enumerate(("query", "key", "value")):
        p[name] = {}
        if w is not None:
            p[name]["kernel"] = np.split(w, 3)[i].T.astype(np.float32)
        if b is not None:
            p[name]["bias"] = np.split(b, 3)[i].astype(np.float32)
    return p


def _fused_qkv(sd, prefix: str) -> dict:
    """timm's ``Attention``: the fused ``qkv`` (3E, E) split into query, key, value; ``proj`` -> ``out_proj``."""
    w, b = sd.get(f"{prefix}.qkv.weight"), sd.get(f"{prefix}.qkv.bias")
    p = {"out_proj": sd.dense(f"{prefix}.proj")}
    for i, name in enumerate(("query", "key", "value")):
        p[name] = {}
        if w is not None:
            p[name]["kernel"] = np.split(w, 3)[i].T.astype(np.float32)
        if b is not None:
            p[name]["bias"] = np.split(b, 3)[i].astype(np.float32)
    return p


def _timm_layout(arch: str, sd, **config) -> dict:
    """Map a timm ViT / DeiT state_dict onto this module's parameter tree (see the module docstring)."""
    get32 = lambda key: None if (v := sd.get(key)) is None else v.astype(np.float32)
    sizes = {**TIMM_SETTINGS, **TIMM_DISTILLED}[arch]
    encoder = {"ln": _layer_norm(sd, "norm")}
    if (pos := get32("pos_embed")) is not None:
        encoder["pos_embedding"] = pos
    for i in range(config.get("num_layers", sizes["num_layers"])):
        pre = f"blocks.{i}"
        encoder[f"encoder_layer_{i}"] = {
            "ln_1": _layer_norm(sd, f"{pre}.norm1"),
            "self_attention": _fused_qkv(sd, f"{pre}.attn"),
            "ln_2": _layer_norm(sd, f"{pre}.norm2"),
            "mlp": {"linear_1": sd.dense(f"{pre}.mlp.fc1"), "linear_2": sd.dense(f"{pre}.mlp.fc2")},
        }
    p = {
        "conv_proj": sd.conv_bn("patch_embed.proj", None),
        "class_token": get32("cls_token"),
        "encoder": encoder,
        "head": sd.dense("head"),
    }
    if arch in TIMM_DISTILLED:
        p["dist_token"] = get32("dist_token")
        p["head_dist"] = sd.dense("head_dist")
    return {k: v for k, v in p.items() if v is not None}


def torch_layout(arch: str, sd, **config) -> dict:
    """Map a torchvision (or timm: ``timm/...``) ViT state_dict onto this module's parameter tree
    (``config``: its size options)."""
    if arch.startswith("timm/"):
        return _timm_layout(arch, sd, **config)
    sd.rename(LEGACY_MLP_KEY, lambda m: f"{m[1]}.{3 * (int(m[2]) - 1)}.{m[3]}")
    get32 = lambda key: None if (v := sd.get(key)) is None else v.astype(np.float32)
    encoder = {"ln": _layer_norm(sd, "encoder.ln")}
    if (pos := get32("encoder.pos_embedding")) is not None:
        encoder["pos_embedding"] = pos
    for i in range(config.get("num_layers", SETTINGS[arch]["num_layers"])):
        pre = f"encoder.layers.encoder_layer_{i}"
        encoder[f"encoder_layer_{i}"] = {
            "ln_1": _layer_norm(sd, f"{pre}.ln_1"),
            "self_attention": _self_attention(sd, f"{pre}.self_attention"),
            "ln_2": _layer_norm(sd, f"{pre}.ln_2"),
            "mlp": {"linear_1": sd.dense(f"{pre}.mlp.0"), "linear_2": sd.dense(f"{pre}.mlp.3")},
        }
    p = {
        "conv_proj": sd.conv_bn("conv_proj", None),
        "class_token": get32("class_token"),
        "encoder": encoder,
        "head": sd.dense("heads.head"),
    }
    if config.get("representation_size") is not None:
        p["pre_logits"] = sd.dense("heads.pre_logits")
    return {k: v for k, v in p.items() if v is not None}


CLASSIFIER = {
    **{a: "heads.head" for a in SETTINGS},
    **{a: "head" for a in {**TIMM_SETTINGS, **TIMM_DISTILLED}},
}  # the logits' layer: class count = its weight's rows
# ModelSpec.config options (torch_config, state_dict_config)
CONFIG_OPTIONS = {
    "patch_size": int,
    "num_layers": options.COUNT,
    "num_heads": options.COUNT,
    "hidden_dim": int,
    "mlp_dim": int,
    "image_size": Annotated[int, options.Range(MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)],
    "representation_size": int | None,
}


FAMILY = Family(
    architectures=ARCHITECTURES,
    torch_layout=torch_layout,
    max_pools=False,
    preprocessing={**PREPROCESSING, **TIMM_PREPROCESSING},
    torch_config=torch_config,
    state_dict_config=state_dict_config,
    input_normalization=INPUT_NORMALIZATION,
    classifier=CLASSIFIER,
    config_options=CONFIG_OPTIONS,
    gradcam_layer=None,  # tokens, not a feature map (the paper has no GradCAM layer for its transformer)
)
