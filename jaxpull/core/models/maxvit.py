"""torchvision's MaxViT: maxvit_t (Tu et al. 2022, "MaxViT: Multi-Axis Vision Transformer").

A GELU stem, then blocks of MaxViT layers, each an MBConv (pre-norm BatchNorm, 1x1 expand,
depthwise 3x3, squeeze-excitation, 1x1 project; an average-pooled 1x1 projection as the
shortcut where it downsamples) followed by two pre-norm transformer layers: attention within
local windows ("window" partition), then attention across a sparse global grid ("grid"
partition), each with relative position biases and an MLP. The classifier is average pool,
LayerNorm, Linear, Tanh, Linear.

Rules (docs/method.md, "The rules"): every GELU (stem, MBConv, MLP) is ``rules.gelu``, the
squeeze-excitation's SiLU ``rules.silu``, every LayerNorm ``rules.layer_norm``, and each
attention layer's rule ``rules.attention`` (the query and key parts of ``to_qkv``
scaled, their biases not; the relative position bias is added to the scores unscaled) with its
softmax through ``rules.attention.probs``. The SE sigmoid, the classifier's Tanh and the BatchNorms keep their
plain derivatives. torchvision's attention softmax is functional (``F.softmax``), so the
paper's module-swapping code leaves it plain; jaxpull applies the attention rule there.

The network is built for one input size (224 for maxvit_t): its partitions and relative
position tables depend on it, and other sizes raise a ValueError. Module names follow
torchvision's (``blocks_0/layers_0/MBconv/conv_a``, ``window_attention/attn_layer_1/to_qkv``),
each BatchNorm (epsilon 1e-3) folded into the convolution before it, or, for the MBConv's
``pre_norm`` (no convolution before it), stored as ``Affine``; ``torch_config`` reads a smaller
torchvision ``MaxVit``'s sizes (the tests').
"""

from __future__ import annotations

from typing import Annotated

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxpull.core.layers import Affine, Conv, Dense, LayerNorm, Projection, SqueezeExcitation, avg_pool
from jaxpull.core.models import options
from jaxpull.core.models.family import Family, GradCamLayer
from jaxpull.core.preprocessing import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, Preprocessing
from jaxpull.core.rules import Rules

BN_EPS = 1e-3  # torchvision's BatchNorm2d(eps=1e-3, momentum=0.01)
LN_EPS = 1e-5  # nn.LayerNorm's default
EXPANSION_RATIO, SQUEEZE_RATIO, MLP_RATIO = 4, 0.25, 4  # torchvision's MaxVit defaults

# torchvision.models.get_model_weights("maxvit_t").DEFAULT.transforms(), read once:
# ImageClassification(crop_size=[224], resize_size=[224], interpolation=BICUBIC)
PREPROCESSING = Preprocessing(crop_size=224, resize_size=224, interpolation="bicubic")

# torchvision's maxvit_t: the builder's size options
DEFAULTS = {
    "maxvit_t": dict(
        image_size=224,
        stem_channels=64,
        partition_size=7,
        block_channels=(64, 128, 256, 512),
        block_layers=(2, 2, 5, 2),
        head_dim=32,
    ),
}


def _conv_output(size: int) -> int:
    """Side of a 3x3, stride 2, padding 1 convolution's output."""
    return (size - 1) // 2 + 1


def grid_sizes(image_size: int, n_blocks: int) -> tuple[int, ...]:
    """The feature-map side inside each block (after the stem's and each block's stride 2)."""
    sizes, size = [], _conv_output(image_size)
    for _ in range(n_blocks):
        size = _conv_output(size)
        sizes.append(size)
    return tuple(sizes)


def relative_position_index(size: int) -> np.ndarray:
    """torchvision's ``_get_relative_position_index(size, size)``: ``(size**2, size**2)`` indices
    into the ``((2 size - 1)**2, heads)`` bias table, one per (query, key) position pair."""
    coords = np.stack(np.meshgrid(np.arange(size), np.arange(size), indexing="ij")).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (size - 1)
    return rel[..., 0] * (2 * size - 1) + rel[..., 1]


def window_partition(x: jax.Array, p: int) -> jax.Array:
    """``(N, H, W, C)`` -> ``(N, H/p * W/p, p * p, C)``: non-overlapping p x p windows."""
    n, h, w, c = x.shape
    x = x.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (h // p) * (w // p), p * p, c)


def window_departition(x: jax.Array, p: int, hp: int, wp: int) -> jax.Array:
    """Inverse of :func:`window_partition`: ``(N, hp * wp, p * p, C)`` -> ``(N, hp p, wp p, C)``."""
    n, _, _, c = x.shape
    return x.reshape(n, hp, wp, p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, hp * p, wp * p, c)


class RelativePositionalMultiHeadAttention(nn.Module):
    """Multi-head self-attention over each group's ``partition_size**2`` tokens, plus a learned
    bias per relative position and head; torchvision scales the keys by ``C**-0.5`` (C the
    feature width, not the head width)."""

    head_dim: int
    partition_size: int

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        """``(N, G, L, C)`` tokens (``L = partition_size**2``) -> ``(N, G, L, C)``."""
        n, g, length, c = x.shape
        heads, s = c // self.head_dim, self.partition_size
        table = self.param(
            "relative_position_bias_table", nn.initializers.truncated_normal(0.02), ((2 * s - 1) ** 2, heads)
        )
        bias = table[relative_position_index(s).reshape(-1)].reshape(length, length, heads).transpose(2, 0, 1)
        heads_first = lambda a: a.reshape(n, g, length, heads, self.head_dim).transpose(0, 1, 3, 2, 4)

        def core(q, k, v):  # (N, G, L, C) each
            q, k, v = heads_first(q), heads_first(k), heads_first(v)  # (N, G, heads, L, head_dim)
            scores = jnp.einsum("nghid,nghjd->nghij", q, k * c**-0.5) + bias
            out = jnp.einsum("nghij,nghjd->nghid", rules.attention.probs(scores), v)
            return out.transpose(0, 1, 3, 2, 4).reshape(n, g, length, c)

        # to_qkv: one Linear(C, 3 C) whose thirds are the query, key and value projections
        qkv, qkv_bias = Projection(3 * c, name="to_qkv")(x)
        assert qkv_bias is not None  # use_bias: to_qkv has one
        (q, k, v), (q_bias, k_bias, v_bias) = jnp.split(qkv, 3, axis=-1), jnp.split(qkv_bias, 3)
        out = rules.attention(core, q, k, v + v_bias, q_bias, k_bias)
        return Dense(c, name="merge")(out)


class PartitionAttentionLayer(nn.Module):
    """Partition into groups of ``partition_size**2`` tokens ("window": each p x p window;
    "grid": the tokens a stride apart across the whole map), then ``x + attention(LN(x))`` and
    ``x + MLP(LN(x))`` (MLP: Linear, GELU, Linear), and back to ``(N, H, W, C)``."""

    head_dim: int
    partition_size: int
    partition_type: str  # "window" or "grid"

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        n, h, w, c = x.shape
        p = self.partition_size if self.partition_type == "window" else h // self.partition_size
        swap = (lambda a: jnp.swapaxes(a, 1, 2)) if self.partition_type == "grid" else (lambda a: a)
        t = swap(window_partition(x, p))  # (N, G, partition_size**2, C)
        y = LayerNorm(LN_EPS, name="attn_layer_0")(t, rules)
        t = t + RelativePositionalMultiHeadAttention(self.head_dim, self.partition_size, name="attn_layer_1")(y, rules)
        y = LayerNorm(LN_EPS, name="mlp_layer_0")(t, rules)
        y = rules.gelu(Dense(c * MLP_RATIO, name="mlp_layer_1")(y))
        t = t + Dense(c, name="mlp_layer_3")(y)
        return window_departition(swap(t), p, h // p, w // p)


class MBConv(nn.Module):
    """``proj(x) + layers(x)``: layers = BN, 1x1 BN GELU, depthwise 3x3 (stride) BN GELU, SE, 1x1;
    proj = [3x3/2 average pool (zero padding counted)] + 1x1 where the shape changes."""

    out_channels: int
    stride: int

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        mid = int(self.out_channels * EXPANSION_RATIO)
        res = x
        if self.stride != 1 or x.shape[-1] != self.out_channels:
            if self.stride == 2:  # nn.AvgPool2d(3, 2, padding=1), count_include_pad=True
                res = avg_pool(jnp.pad(res, ((0, 0), (1, 1), (1, 1), (0, 0))), 3, 2)
            res = Conv(self.out_channels, 1, use_bias=True, name="proj")(res)
        y = Affine(name="pre_norm")(x)
        y = rules.gelu(Conv(mid, 1, use_bias=True, name="conv_a")(y))
        y = rules.gelu(Conv(mid, 3, self.stride, 1, groups=mid, use_bias=True, name="conv_b")(y))
        y = SqueezeExcitation(int(self.out_channels * SQUEEZE_RATIO), "silu", name="squeeze_excitation")(y, rules)
        return res + Conv(self.out_channels, 1, use_bias=True, name="conv_c")(y)


class MaxVitLayer(nn.Module):
    """MBConv, then window attention, then grid attention (``layers``)."""

    out_channels: int
    stride: int
    head_dim: int
    partition_size: int

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        x = MBConv(self.out_channels, self.stride, name="MBconv")(x, rules)
        for kind in ("window", "grid"):
            x = PartitionAttentionLayer(self.head_dim, self.partition_size, kind, name=f"{kind}_attention")(x, rules)
        return x


class MaxVitBlock(nn.Module):
    """``n_layers`` MaxViT layers (``layers_0`` ...); the first halves the resolution."""

    out_channels: int
    n_layers: int
    head_dim: int
    partition_size: int

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        for i in range(self.n_layers):
            x = MaxVitLayer(
                self.out_channels, 2 if i == 0 else 1, self.head_dim, self.partition_size, name=f"layers_{i}"
            )(x, rules)
        return x


class MaxVit(nn.Module):
    """torchvision ``MaxVit``: stem (3x3/2 conv BN GELU, 3x3 conv), blocks, classifier."""

    image_size: int
    stem_channels: int
    partition_size: int
    block_channels: tuple[int, ...]
    block_layers: tuple[int, ...]
    head_dim: int
    num_classes: int = 1000
    arch: str | None = None  # for messages

    def check(self, x: jax.Array) -> None:
        """ValueError unless ``x`` is ``(N, image_size, image_size, 3)`` and the sizes partition."""
        s = self.image_size
        name = self.arch or f"this MaxViT (image_size {s})"
        if tuple(x.shape[1:3]) != (s, s):
            raise ValueError(
                f"{name} needs {s}x{s} images (its attention partitions and relative position "
                f"tables are built for that size), got {x.shape[1]}x{x.shape[2]}: resize them to {s}x{s}"
            )
        for i, g in enumerate(grid_sizes(s, len(self.block_channels))):
            if g % self.partition_size:
                raise ValueError(
                    f"{name}: block {i}'s {g}x{g} feature map does not split into partitions of "
                    f"{self.partition_size}: choose another image_size or partition_size"
                )

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        """``(N, image_size, image_size, 3)`` normalised images -> logits ``(N, num_classes)``."""
        self.check(x)
        x = rules.gelu(Conv(self.stem_channels, 3, 2, 1, use_bias=True, name="stem_0")(x))
        x = Conv(self.stem_channels, 3, 1, 1, use_bias=True, name="stem_1")(x)
        for i, (channels, n_layers) in enumerate(zip(self.block_channels, self.block_layers, strict=True)):
            x = MaxVitBlock(channels, n_layers, self.head_dim, self.partition_size, name=f"blocks_{i}")(x, rules)
        x = LayerNorm(LN_EPS, name="classifier_2")(jnp.mean(x, axis=(1, 2)), rules)
        x = jnp.tanh(Dense(x.shape[-1], name="classifier_3")(x))
        return Dense(self.num_classes, use_bias=False, name="classifier_5")(x)


def _options(arch: str, config: dict) -> dict:
    """The named architecture's size options, with ``config``'s (lists as tuples) over them."""
    unknown = sorted(set(config) - set(DEFAULTS[arch]))
    if unknown:
        raise ValueError(f"unknown MaxViT option(s) {', '.join(unknown)}: use {', '.join(DEFAULTS[arch])}")
    return {**DEFAULTS[arch], **{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}}


def _builder(arch: str):
    def build(num_classes: int = 1000, **config) -> MaxVit:
        return MaxVit(**_options(arch, config), num_classes=num_classes, arch=arch if not config else None)

    return build


ARCHITECTURES = {arch: _builder(arch) for arch in DEFAULTS}


def torch_config(module) -> dict:
    """The builder options of a torchvision ``MaxVit`` that differ from maxvit_t's.

    The input size is read off the first block's feature map (4x its side: torchvision builds
    its tables for that map, and maxvit_t's 224 is 4 x 56). ValueError for what jaxpull's
    MaxViT does not take (non-square inputs, other ratios, activations or norms).
    """
    from torch import nn as tnn

    gh, gw = module.blocks[0].grid_size
    first = module.blocks[0].layers[0].layers
    mlp = first.window_attention.mlp_layer
    out = first.MBconv.layers.conv_c.out_channels
    problems = []
    if gh != gw:
        problems.append(f"non-square input (block 0 feature map {gh}x{gw})")
    if first.MBconv.layers.conv_a[0].out_channels != int(out * EXPANSION_RATIO):
        problems.append(f"expansion_ratio other than {EXPANSION_RATIO}")
    if first.MBconv.layers.squeeze_excitation.fc1.out_channels != int(out * SQUEEZE_RATIO):
        problems.append(f"squeeze_ratio other than {SQUEEZE_RATIO}")
    if mlp[1].out_features != out * MLP_RATIO:
        problems.append(f"mlp_ratio other than {MLP_RATIO}")
    if not isinstance(module.stem[0][2], tnn.GELU) or module.stem[0][2].approximate != "none":
        problems.append(f"activation {type(module.stem[0][2]).__name__} (jaxpull's MaxViT has GELU)")
    bn = module.stem[0][1]
    if not isinstance(bn, tnn.BatchNorm2d) or bn.eps != BN_EPS:
        problems.append(f"norm layer other than BatchNorm2d(eps={BN_EPS})")
    if problems:
        raise ValueError(f"jaxpull's MaxViT cannot convert this model: {'; '.join(problems)}")
    config = dict(
        image_size=4 * gh,
        stem_channels=module.stem[0][0].out_channels,
        partition_size=module.partition_size,
        block_channels=tuple(b.layers[0].layers.MBconv.layers.conv_c.out_channels for b in module.blocks),
        block_layers=tuple(len(b.layers) for b in module.blocks),
        head_dim=first.window_attention.attn_layer[1].head_dim,
    )
    return {k: v for k, v in config.items() if v != DEFAULTS["maxvit_t"][k]}


def _linear_no_bias(sd, prefix: str) -> dict:
    w = sd.get(f"{prefix}.weight")
    return {} if w is None else {"kernel": w.T.astype(np.float32)}


def _layer_norm(sd, prefix: str) -> dict:
    scale, bias = sd.get(f"{prefix}.weight"), sd.get(f"{prefix}.bias")
    return {k: v.astype(np.float32) for k, v in (("scale", scale), ("bias", bias)) if v is not None}


def _attention_layer(sd, prefix: str, partition_size: int) -> dict:
    """A ``PartitionAttentionLayer``'s parameters; its ``relative_position_index`` buffer is
    checked against the one the Flax module computes."""
    attn = f"{prefix}.attn_layer.1"
    index = sd.get(f"{attn}.relative_position_index")
    if index is not None and not np.array_equal(index, relative_position_index(partition_size)):
        raise ValueError(
            f"{attn}.relative_position_index is not torchvision's for partition size {partition_size}: "
            "is the state_dict a torchvision MaxVit of these sizes?"
        )
    table = sd.get(f"{attn}.relative_position_bias_table")
    return {
        "attn_layer_0": _layer_norm(sd, f"{prefix}.attn_layer.0"),
        "attn_layer_1": {
            "to_qkv": sd.dense(f"{attn}.to_qkv"),
            "merge": sd.dense(f"{attn}.merge"),
            **({} if table is None else {"relative_position_bias_table": table.astype(np.float32)}),
        },
        "mlp_layer_0": _layer_norm(sd, f"{prefix}.mlp_layer.0"),
        "mlp_layer_1": sd.dense(f"{prefix}.mlp_layer.1"),
        "mlp_layer_3": sd.dense(f"{prefix}.mlp_layer.3"),
    }


def _mbconv(sd, prefix: str) -> dict:
    layers = f"{prefix}.layers"
    p = {
        "pre_norm": sd.affine(f"{layers}.pre_norm", BN_EPS),
        "conv_a": sd.conv_bn(f"{layers}.conv_a.0", f"{layers}.conv_a.1", BN_EPS),
        "conv_b": sd.conv_bn(f"{layers}.conv_b.0", f"{layers}.conv_b.1", BN_EPS),
        "squeeze_excitation": {fc: sd.conv_bn(f"{layers}.squeeze_excitation.{fc}", None) for fc in ("fc1", "fc2")},
        "conv_c": sd.conv_bn(f"{layers}.conv_c", None),
    }
    for i in (0, 1):  # proj.1 after the average pool of a strided layer, proj.0 otherwise
        if sd.has(f"{prefix}.proj.{i}.weight"):
            p["proj"] = sd.conv_bn(f"{prefix}.proj.{i}", None)
    return p


def torch_layout(arch: str, sd, **config) -> dict:
    """Map a torchvision MaxVit state_dict onto this module's parameter tree."""
    o = _options(arch, config)
    p = {
        "stem_0": sd.conv_bn("stem.0.0", "stem.0.1", BN_EPS),
        "stem_1": sd.conv_bn("stem.1.0", None),
        "classifier_2": _layer_norm(sd, "classifier.2"),
        "classifier_3": sd.dense("classifier.3"),
        "classifier_5": _linear_no_bias(sd, "classifier.5"),
    }
    for i, n_layers in enumerate(o["block_layers"]):
        block = {}
        for j in range(n_layers):
            pre = f"blocks.{i}.layers.{j}.layers"
            block[f"layers_{j}"] = {
                "MBconv": _mbconv(sd, f"{pre}.MBconv"),
                **{
                    f"{kind}_attention": _attention_layer(sd, f"{pre}.{kind}_attention", o["partition_size"])
                    for kind in ("window", "grid")
                },
            }
        p[f"blocks_{i}"] = block
    return p


CLASSIFIER = "classifier.5"  # the logits' layer in the state_dict: the number of classes is its weight's rows
# ModelSpec.config options (a model of other sizes: torch_config), over DEFAULTS
CONFIG_OPTIONS = {
    "image_size": Annotated[int, options.Range(MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)],
    "stem_channels": int,
    "partition_size": int,
    "block_channels": tuple[int, ...],
    "block_layers": tuple[options.COUNT, ...],
    "head_dim": int,
}


FAMILY = Family(
    architectures=ARCHITECTURES,
    torch_layout=torch_layout,
    max_pools=False,
    preprocessing=PREPROCESSING,
    torch_config=torch_config,
    classifier=CLASSIFIER,
    config_options=CONFIG_OPTIONS,
    gradcam_layer=GradCamLayer("blocks.-1"),  # the last block's feature map
)
