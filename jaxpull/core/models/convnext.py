"""torchvision's ConvNeXt: convnext_tiny, convnext_small, convnext_base, convnext_large.

A 4x4/4 "patchify" stem with LayerNorm, four stages of ConvNeXt blocks (depthwise 7x7 ->
LayerNorm -> Linear 4x -> GELU -> Linear, scaled per channel by ``layer_scale``, plus the input)
separated by downsampling layers (LayerNorm, 2x2/2 convolution), then a global average pool,
LayerNorm and ``Linear``. Stochastic depth is the identity in eval mode.

The rules (docs/method.md, "The rules"): every GELU is gated (``rules.gelu``) and every
LayerNorm goes through ``rules.layer_norm``; torchvision's channels-first ``LayerNorm2d`` is that
same LayerNorm over the channels of NHWC. The layer scales, residual adds, convolutions and
linear layers keep their plain derivatives. This is also the reference code's treatment (it
swaps ``nn.GELU``, ``nn.LayerNorm`` and ``LayerNorm2d`` modules; torchvision's ConvNeXt has no
functional activations or norms).

Module names follow torchvision's ``features.N`` (``features_0`` the stem, then stages with
blocks ``block_J`` and downsampling layers, alternating) and ``classifier.0`` / ``classifier.2``;
inside a block, ``dwconv``, ``norm``, ``pwconv1``, ``pwconv2`` are torchvision's ``block.0``,
``block.2``, ``block.3``, ``block.5``. Any input of at least 32x32 pixels works (the stem and
the downsamplings floor odd sizes as torch does).
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import flax.linen as nn
import jax
import numpy as np

from jaxpull.core.rules import Rules
from jaxpull.core.layers import Conv, Dense, LayerNorm, global_avg_pool
from jaxpull.core.preprocessing import Preprocessing
from jaxpull.core.models.family import Family, GradCamLayer

LN_EPS = 1e-6

# A stage: torchvision's CNBlockConfig (input channels, output channels of the downsampling
# after it or None, number of blocks).
StageSetting = Tuple[int, Optional[int], int]

# torchvision's block_setting of each model
SETTINGS = {
    "convnext_tiny": ((96, 192, 3), (192, 384, 3), (384, 768, 9), (768, None, 3)),
    "convnext_small": ((96, 192, 3), (192, 384, 3), (384, 768, 27), (768, None, 3)),
    "convnext_base": ((128, 256, 3), (256, 512, 3), (512, 1024, 27), (1024, None, 3)),
    "convnext_large": ((192, 384, 3), (384, 768, 3), (768, 1536, 27), (1536, None, 3)),
}

# torchvision's ConvNeXt_*_Weights.DEFAULT.transforms() (torchvision 0.29): crop 224, bilinear,
# resize 236 / 230 / 232 / 232.
PREPROCESSING = {
    "convnext_tiny": Preprocessing(crop_size=224, resize_size=236, interpolation="bilinear"),
    "convnext_small": Preprocessing(crop_size=224, resize_size=230, interpolation="bilinear"),
    "convnext_base": Preprocessing(crop_size=224, resize_size=232, interpolation="bilinear"),
    "convnext_large": Preprocessing(crop_size=224, resize_size=232, interpolation="bilinear"),
}


class CNBlock(nn.Module):
    """``x + layer_scale * pwconv2(gelu(pwconv1(norm(dwconv(x)))))`` on ``(N, H, W, C)``."""

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        dim = x.shape[-1]
        y = Conv(dim, 7, 1, 3, groups=dim, use_bias=True, name="dwconv")(x)
        y = LayerNorm(LN_EPS, name="norm")(y, rules)
        y = rules.gelu(Dense(4 * dim, name="pwconv1")(y))
        y = Dense(dim, name="pwconv2")(y)
        layer_scale = self.param("layer_scale", nn.initializers.constant(1e-6), (dim,))
        return x + layer_scale * y


def min_image_size(block_setting: Tuple[StageSetting, ...]) -> int:
    """The smallest input side ConvNeXt takes: 4 (stem) times 2 per downsampling layer."""
    return 4 * 2 ** sum(out is not None for _, out, _ in block_setting)


class Stage(nn.Module):
    """``features.N`` of a stage: ``depth`` blocks named ``block_0``, ``block_1``, ..."""

    depth: int

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        for j in range(self.depth):
            x = CNBlock(name=f"block_{j}")(x, rules)
        return x


class Downsampling(nn.Module):
    """``features.N`` between stages: LayerNorm2d ``norm``, then the 2x2/2 convolution ``conv``."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        x = LayerNorm(LN_EPS, name="norm")(x, rules)
        return Conv(self.features, 2, 2, 0, use_bias=True, name="conv")(x)


class Stem(nn.Module):
    """``features.0``: the 4x4/4 convolution ``conv``, then LayerNorm2d ``norm``."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        x = Conv(self.features, 4, 4, 0, use_bias=True, name="conv")(x)
        return LayerNorm(LN_EPS, name="norm")(x, rules)


class ConvNeXt(nn.Module):
    """torchvision ``ConvNeXt``: stem, stages and downsamplings, average pool, LayerNorm, ``Linear``.

    ``block_setting``: torchvision's list of ``CNBlockConfig`` as ``(input channels, output
    channels or None, blocks)`` triples.
    """

    block_setting: Tuple[StageSetting, ...]
    num_classes: int = 1000

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        smallest = min_image_size(self.block_setting)
        if min(x.shape[1:3]) < smallest:
            raise ValueError(
                f"ConvNeXt needs images of at least {smallest}x{smallest} pixels, got "
                f"{x.shape[1]}x{x.shape[2]}: use a larger image"
            )
        x = Stem(self.block_setting[0][0], name="features_0")(x, rules)
        i = 1
        for _, out, depth in self.block_setting:
            x = Stage(depth, name=f"features_{i}")(x, rules)
            i += 1
            if out is not None:
                x = Downsampling(out, name=f"features_{i}")(x, rules)
                i += 1
        x = LayerNorm(LN_EPS, name="classifier_0")(global_avg_pool(x), rules)  # LayerNorm2d on (N, C, 1, 1)
        return Dense(self.num_classes, name="classifier_2")(x)


ARCHITECTURES = {arch: functools.partial(ConvNeXt, block_setting=setting) for arch, setting in SETTINGS.items()}


def torch_config(module) -> dict:
    """``{"block_setting": ...}`` read off a torchvision ``ConvNeXt`` whose stages differ from every
    named model's (a small test model); ``{}`` for the named models' settings."""
    setting, stages = [], list(module.features)[1:]
    for k, stage in enumerate(stages):
        if type(stage[0]).__name__ != "CNBlock":
            continue
        channels = int(stage[0].layer_scale.shape[0])
        after = stages[k + 1] if k + 1 < len(stages) else None
        setting.append((channels, None if after is None else int(after[1].out_channels), len(stage)))
    setting = tuple(setting)
    return {} if setting in SETTINGS.values() else {"block_setting": setting}


def _layer_norm(sd, prefix: str) -> dict:
    """A LayerNorm / LayerNorm2d: ``weight`` -> ``scale``, ``bias``."""
    w, b = sd.get(f"{prefix}.weight"), sd.get(f"{prefix}.bias")
    return {k: v.astype(np.float32) for k, v in (("scale", w), ("bias", b)) if v is not None}


def _block(sd, prefix: str) -> dict:
    """A ``CNBlock``: ``block.0`` (depthwise conv), ``.2`` (LayerNorm), ``.3`` / ``.5`` (Linear), layer scale."""
    p = {
        "dwconv": sd.conv_bn(f"{prefix}.block.0", None),
        "norm": _layer_norm(sd, f"{prefix}.block.2"),
        "pwconv1": sd.dense(f"{prefix}.block.3"),
        "pwconv2": sd.dense(f"{prefix}.block.5"),
    }
    scale = sd.get(f"{prefix}.layer_scale")  # (C, 1, 1)
    if scale is not None:
        p["layer_scale"] = scale.reshape(-1).astype(np.float32)
    return p


def torch_layout(arch: str, sd, block_setting: Optional[Tuple[StageSetting, ...]] = None) -> dict:
    """Map a torchvision ConvNeXt state_dict onto this module's parameter tree."""
    block_setting = SETTINGS[arch] if block_setting is None else block_setting
    p = {
        "features_0": {"conv": sd.conv_bn("features.0.0", None), "norm": _layer_norm(sd, "features.0.1")},
        "classifier_0": _layer_norm(sd, "classifier.0"),
        "classifier_2": sd.dense("classifier.2"),
    }
    i = 1
    for _, out, depth in block_setting:
        p[f"features_{i}"] = {f"block_{j}": _block(sd, f"features.{i}.{j}") for j in range(depth)}
        i += 1
        if out is not None:
            p[f"features_{i}"] = {
                "norm": _layer_norm(sd, f"features.{i}.0"),
                "conv": sd.conv_bn(f"features.{i}.1", None),
            }
            i += 1
    return p


FAMILY = Family(
    architectures=ARCHITECTURES,
    torch_layout=torch_layout,
    max_pools=False,
    preprocessing=PREPROCESSING,
    torch_config=torch_config,
    gradcam_layer=GradCamLayer("features.-1"),  # the last stage
)
