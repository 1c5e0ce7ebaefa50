"""ConvNeXt: torchvision's convnext_tiny, convnext_small, convnext_base, convnext_large and timm's
``timm/convnext_tiny``, ``timm/convnext_small``, ``timm/convnext_base``, ``timm/convnext_large``.

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

timm's ``ConvNeXt`` with its defaults (patch stem, ``conv_mlp=False``, kernel 7, layer scale,
LayerNorm eps 1e-6, GELU, ``NormMlpClassifierHead`` without hidden layer) computes the same
function with timm's names: ``stem.0`` / ``stem.1`` -> ``features_0``; ``stages.i.downsample.0``
(LayerNorm2d) / ``.1`` (2x2/2 convolution) -> the downsampling layer before stage i; in a block
``conv_dw``, ``norm``, ``mlp.fc1``, ``mlp.fc2``, ``gamma`` -> ``dwconv``, ``norm``, ``pwconv1``,
``pwconv2``, ``layer_scale``; ``head.norm`` / ``head.fc`` -> ``classifier_0`` / ``classifier_2``.
A timm ConvNeXt built without layer scale (``ls_init_value=None``) converts with layer scales of
one. timm's GELU is its own module (``timm.layers.activations.GELU``, ``F.gelu``): the same exact
GELU, ``rules.gelu`` here.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import numpy as np

from jaxpull.core.layers import Conv, Dense, LayerNorm, global_avg_pool
from jaxpull.core.models import options
from jaxpull.core.models.family import Family, GradCamLayer
from jaxpull.core.preprocessing import Preprocessing
from jaxpull.core.rules import Rules

LN_EPS = 1e-6

# A stage: torchvision's CNBlockConfig (input channels, output channels of the downsampling
# after it or None, number of blocks).
StageSetting = tuple[int, int | None, int]

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


def min_image_size(block_setting: tuple[StageSetting, ...]) -> int:
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

    block_setting: tuple[StageSetting, ...]
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


# timm 1.0.31's convnext_* (depths, dims) give torchvision's block settings.
TIMM_SETTINGS = {f"timm/{arch}": setting for arch, setting in SETTINGS.items()}
# The pretrained_cfg of each name's default weights (timm 1.0.31, read once): input 224, bicubic,
# ImageNet's mean and std; crop_pct 0.95 (tiny, small: in12k_ft_in1k) and 0.875 (base, large: fb_in22k_ft_in1k).
TIMM_PREPROCESSING = {
    "timm/convnext_tiny": Preprocessing(224, 235, "bicubic"),
    "timm/convnext_small": Preprocessing(224, 235, "bicubic"),
    "timm/convnext_base": Preprocessing(224, 256, "bicubic"),
    "timm/convnext_large": Preprocessing(224, 256, "bicubic"),
}

ARCHITECTURES = {
    arch: functools.partial(ConvNeXt, block_setting=setting) for arch, setting in {**SETTINGS, **TIMM_SETTINGS}.items()
}


def torch_config(module) -> dict:
    """``{"block_setting": ...}`` read off a torchvision (or timm: :func:`timm_torch_config`)
    ``ConvNeXt`` whose stages differ from every named model's (a small test model); ``{}`` for the
    named models' settings."""
    if type(module).__module__.startswith("timm."):
        return timm_torch_config(module)
    setting, stages = [], list(module.features)[1:]
    for k, stage in enumerate(stages):
        if type(stage[0]).__name__ != "CNBlock":
            continue
        channels = int(stage[0].layer_scale.shape[0])
        after = stages[k + 1] if k + 1 < len(stages) else None
        setting.append((channels, None if after is None else int(after[1].out_channels), len(stage)))
    block_setting = tuple(setting)
    return {} if block_setting in SETTINGS.values() else {"block_setting": block_setting}


def timm_torch_config(module) -> dict:
    """``{"block_setting": ...}`` of a timm ``ConvNeXt`` of other sizes than the named models'
    (``{}`` for theirs).

    Raises:
      ValueError: one line naming the first timm option this module does not compute (another
        stem, ``conv_mlp``, kernel size, MLP ratio, GRN (ConvNeXt-V2), activation, norm or its
        eps, dilation, ``head_norm_first``, a head hidden layer, another global pool).
    """
    from timm.layers import LayerNorm, LayerNorm2d, Mlp
    from timm.layers.activations import GELU
    from torch import nn as tnn

    if type(module).__name__ != "ConvNeXt":
        raise ValueError(f"timm's {type(module).__name__} is not a ConvNeXt jaxpull converts: use timm's convnext_*")

    def need(ok: bool, what: str, fix: str):
        if not ok:
            raise ValueError(f"this timm ConvNeXt has {what}, which jaxpull's ConvNeXt does not compute: {fix}")

    stem = module.stem
    need(
        len(stem) == 2 and stem[0].kernel_size == (4, 4) and stem[0].stride == (4, 4) and stem[0].bias is not None,
        "another stem",
        "use stem_type='patch', patch_size=4 and conv_bias=True",
    )
    need(isinstance(module.norm_pre, tnn.Identity), "head_norm_first=True", "use head_norm_first=False")
    head = module.head
    need(
        type(head).__name__ == "NormMlpClassifierHead" and isinstance(head.pre_logits, tnn.Identity),
        "a head hidden layer or another head",
        "use head_hidden_size=None",
    )
    need(
        head.global_pool.pool_type == "avg" and isinstance(head.fc, tnn.Linear),
        "another global pool or no classifier",
        "use global_pool='avg' and num_classes > 0",
    )
    setting = []
    for k, stage in enumerate(module.stages):
        if k > 0:
            ds = stage.downsample
            need(
                isinstance(ds, tnn.Sequential) and ds[1].kernel_size == (2, 2) and ds[1].stride == (2, 2),
                f"stage {k} without a 2x2/2 downsampling",
                "use output_stride=32",
            )
        else:
            need(
                isinstance(stage.downsample, tnn.Identity), "a downsampling before stage 0", "use dims[0] for the stem"
            )
        for b in stage.blocks:
            c = b.conv_dw.in_channels
            need(not b.use_conv_mlp, "conv_mlp=True", "use conv_mlp=False")
            need(
                b.conv_dw.kernel_size == (7, 7) and b.conv_dw.padding == (3, 3) and b.conv_dw.dilation == (1, 1),
                f"a {b.conv_dw.kernel_size} depthwise convolution",
                "use kernel_sizes=7",
            )
            need(b.conv_dw.bias is not None, "convolutions without bias", "use conv_bias=True")
            need(
                type(b.mlp) is Mlp and b.mlp.fc1.out_features == 4 * c,
                "another MLP (GRN or a ratio other than 4)",
                "use use_grn=False, mlp_ratio=4",
            )
            need(
                type(b.mlp.act) is GELU or (type(b.mlp.act) is tnn.GELU and b.mlp.act.approximate == "none"),
                f"activation {type(b.mlp.act).__name__}",
                "use act_layer='gelu'",
            )
            need(isinstance(b.shortcut, tnn.Identity), "a downsampling block shortcut", "use timm's convnext_* stages")
        dims = int(stage.blocks[0].conv_dw.in_channels)
        after = module.stages[k + 1] if k + 1 < len(module.stages) else None
        setting.append((dims, None if after is None else int(after.downsample[1].out_channels), len(stage.blocks)))
    norms = [
        m for m in module.modules() if isinstance(m, tnn.LayerNorm) or type(m).__name__.endswith(("Norm", "Norm2d"))
    ]
    need(
        all(type(m) in (LayerNorm, LayerNorm2d) and m.eps == LN_EPS and m.weight is not None for m in norms),
        "another norm layer or eps",
        f"use timm's default LayerNorm (eps {LN_EPS})",
    )
    block_setting = tuple(setting)
    return {} if block_setting in SETTINGS.values() else {"block_setting": block_setting}


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


def _timm_block(sd, prefix: str) -> dict:
    """A timm ``ConvNeXtBlock``: ``conv_dw``, ``norm``, ``mlp.fc1`` / ``fc2``, ``gamma`` (ones if absent)."""
    p = {
        "dwconv": sd.conv_bn(f"{prefix}.conv_dw", None),
        "norm": _layer_norm(sd, f"{prefix}.norm"),
        "pwconv1": sd.dense(f"{prefix}.mlp.fc1"),
        "pwconv2": sd.dense(f"{prefix}.mlp.fc2"),
    }
    if sd.has(f"{prefix}.gamma"):
        p["layer_scale"] = sd.get(f"{prefix}.gamma").reshape(-1).astype(np.float32)
    elif "bias" in p["dwconv"]:  # built without layer scale (ls_init_value=None): the identity
        p["layer_scale"] = np.ones_like(p["dwconv"]["bias"])
    return p


def _timm_layout(sd, block_setting: tuple[StageSetting, ...]) -> dict:
    """Map a timm ConvNeXt state_dict onto this module's parameter tree (see the module docstring)."""
    p = {
        "features_0": {"conv": sd.conv_bn("stem.0", None), "norm": _layer_norm(sd, "stem.1")},
        "classifier_0": _layer_norm(sd, "head.norm"),
        "classifier_2": sd.dense("head.fc"),
    }
    i = 1
    for k, (_, out, depth) in enumerate(block_setting):
        p[f"features_{i}"] = {f"block_{j}": _timm_block(sd, f"stages.{k}.blocks.{j}") for j in range(depth)}
        i += 1
        if out is not None:
            p[f"features_{i}"] = {
                "norm": _layer_norm(sd, f"stages.{k + 1}.downsample.0"),
                "conv": sd.conv_bn(f"stages.{k + 1}.downsample.1", None),
            }
            i += 1
    return p


def torch_layout(arch: str, sd, block_setting: tuple[StageSetting, ...] | None = None) -> dict:
    """Map a torchvision (or timm: ``timm/...``) ConvNeXt state_dict onto this module's parameter tree."""
    block_setting = {**SETTINGS, **TIMM_SETTINGS}[arch] if block_setting is None else block_setting
    if arch.startswith("timm/"):
        return _timm_layout(sd, block_setting)
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


CLASSIFIER = {**{a: "classifier.2" for a in SETTINGS}, **{a: "head.fc" for a in TIMM_SETTINGS}}  # the logits' layer
# ModelSpec.config options (a small test model's stages: torch_config)
CONFIG_OPTIONS = {"block_setting": tuple[tuple[int, int | None, options.COUNT], ...]}


FAMILY = Family(
    architectures=ARCHITECTURES,
    torch_layout=torch_layout,
    max_pools=False,
    preprocessing={**PREPROCESSING, **TIMM_PREPROCESSING},
    torch_config=torch_config,
    classifier=CLASSIFIER,
    config_options=CONFIG_OPTIONS,
    gradcam_layer=GradCamLayer("features.-1"),  # the last stage
)
