"""ResNets: torchvision's resnet18/34/50/101/152, resnext50_32x4d, resnext101_32x8d,
resnext101_64x4d, wide_resnet50_2, wide_resnet101_2, and timm's ``timm/resnet18`` ... ``timm/resnet152``
with their ResNet-D variants ``timm/resnet18d`` ... ``timm/resnet152d``.

Module and parameter names follow torchvision's (``layer1/0/conv1``), with each convolution's
BatchNorm folded into it (``bn1`` lives inside ``conv1`` as its bias and scaled kernel).

timm's ResNet (``timm.models.resnet.ResNet``) with the default 7x7 stem computes what torchvision's
does, with the same state_dict keys (``conv1``, ``bn1``, ``layer1.0.conv1`` ... ``fc``): timm's
``resnet50`` (its ``a1_in1k`` weights) is torchvision's resnet50 architecture. timm's
``zero_init_last`` (the last BatchNorm of each block initialised to zero) is an initialisation
only; it changes nothing in a trained or converted model. The ResNet-D variants (``resnet50d``:
``stem_type="deep"``, ``stem_width=32``, ``avg_down=True``) are options of the same module:

- ``deep_stem``: three 3x3 convolutions (``stem_width``, ``stem_width``, ``2 * stem_width``
  channels, the first of stride 2) each followed by BatchNorm and ReLU, instead of the 7x7 one
  (timm's ``conv1.0`` / ``conv1.1``, ``conv1.3`` / ``conv1.4``, ``conv1.6`` / ``bn1``: here
  ``conv1_0``, ``conv1_3``, ``conv1_6``);
- ``avg_down``: the shortcut's downsampling is a 2x2 average pool (ceil mode, stride 2) and a
  stride-1 1x1 convolution (timm's ``downsample.1`` / ``downsample.2``) instead of a strided 1x1
  convolution.

The rules: every ReLU (the stem's three too) is ``rules.relu`` and the stem's 3x3/2 max-pool
``rules.max_pool``; the average pools keep their plain derivatives (docs/method.md).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Literal, NoReturn

import flax.linen as nn
import jax

from jaxpull.core.layers import Conv, Dense, avg_pool_ceil, global_avg_pool
from jaxpull.core.models import options
from jaxpull.core.models.family import Family, GradCamLayer
from jaxpull.core.preprocessing import Preprocessing
from jaxpull.core.rules import Rules


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a residual connection (resnet18/34)."""

    planes: int
    stride: int = 1
    downsample: bool = False
    groups: int = 1
    base_width: int = 64
    avg_down: bool = False
    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        identity = x
        y = Conv(self.planes, 3, self.stride, 1, use_bias=True, name="conv1")(x)
        y = rules.relu(y)
        y = Conv(self.planes, 3, 1, 1, use_bias=True, name="conv2")(y)
        if self.downsample:
            identity = _shortcut(x, self.planes, self.stride, self.avg_down)
        return rules.relu(y + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (grouped, strided) -> 1x1 convolutions and a residual connection."""

    planes: int
    stride: int = 1
    downsample: bool = False
    groups: int = 1
    base_width: int = 64
    avg_down: bool = False
    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        width = int(self.planes * (self.base_width / 64.0)) * self.groups
        identity = x
        y = rules.relu(Conv(width, 1, 1, 0, use_bias=True, name="conv1")(x))
        y = rules.relu(Conv(width, 3, self.stride, 1, self.groups, use_bias=True, name="conv2")(y))
        y = Conv(self.planes * 4, 1, 1, 0, use_bias=True, name="conv3")(y)
        if self.downsample:
            identity = _shortcut(x, self.planes * 4, self.stride, self.avg_down)
        return rules.relu(y + identity)


def _shortcut(x: jax.Array, features: int, stride: int, avg_down: bool) -> jax.Array:
    """The ``downsample`` branch (called inside a block's compact ``__call__``): a strided 1x1
    convolution, or with ``avg_down`` a 2x2 ceil-mode average pool (stride > 1) and a 1x1 one."""
    if avg_down:
        x = avg_pool_ceil(x, 2, stride) if stride > 1 else x
        return Conv(features, 1, 1, 0, use_bias=True, name="downsample")(x)
    return Conv(features, 1, stride, 0, use_bias=True, name="downsample")(x)


class Stage(nn.Module):
    """torchvision's ``layerN``: a sequence of blocks named ``0``, ``1``, ..."""

    block: type[BasicBlock | Bottleneck]
    planes: int
    blocks: int
    stride: int
    downsample: bool
    groups: int
    base_width: int
    avg_down: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        for i in range(self.blocks):
            x = self.block(
                self.planes,
                self.stride if i == 0 else 1,
                self.downsample and i == 0,
                self.groups,
                self.base_width,
                self.avg_down,
                name=str(i),
            )(x, rules)
        return x


class ResNet(nn.Module):
    """torchvision ``ResNet``: stem, four stages, global average pool, ``fc``. With ``deep_stem``
    and ``avg_down``, timm's ResNet-D; ``channels``: the stages' widths (timm's option)."""

    block: type[BasicBlock | Bottleneck]
    stage_sizes: Sequence[int]
    groups: int = 1
    width_per_group: int = 64
    num_classes: int = 1000
    deep_stem: bool = False
    stem_width: int = 32
    avg_down: bool = False
    channels: Sequence[int] = (64, 128, 256, 512)

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        if self.deep_stem:
            w = self.stem_width
            x = rules.relu(Conv(w, 3, 2, 1, use_bias=True, name="conv1_0")(x))
            x = rules.relu(Conv(w, 3, 1, 1, use_bias=True, name="conv1_3")(x))
            x = rules.relu(Conv(2 * w, 3, 1, 1, use_bias=True, name="conv1_6")(x))
            inplanes = 2 * w
        else:
            x = rules.relu(Conv(64, 7, 2, 3, use_bias=True, name="conv1")(x))
            inplanes = 64
        x = rules.max_pool(x, 3, 2, 1)
        for i, (n, planes) in enumerate(zip(self.stage_sizes, self.channels, strict=True)):
            stride = 1 if i == 0 else 2
            downsample = stride != 1 or inplanes != planes * self.block.expansion
            x = Stage(
                self.block,
                planes,
                n,
                stride,
                downsample,
                self.groups,
                self.width_per_group,
                self.avg_down,
                name=f"layer{i + 1}",
            )(x, rules)
            inplanes = planes * self.block.expansion
        return Dense(self.num_classes, name="fc")(global_avg_pool(x))


BLOCKS: dict[str, type[BasicBlock | Bottleneck]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


def timm_resnet(
    block: str,
    stage_sizes: Sequence[int],
    *,
    deep_stem: bool = False,
    stem_width: int = 32,
    avg_down: bool = False,
    channels: Sequence[int] = (64, 128, 256, 512),
    groups: int = 1,
    width_per_group: int = 64,
    num_classes: int = 1000,
) -> ResNet:
    """The :class:`ResNet` of timm's options (``block``: ``"basic"`` or ``"bottleneck"``), every one
    a JSON value so that a model of other sizes records them in its file (``ModelSpec.config``)."""
    if block not in BLOCKS:
        raise ValueError(f"unknown ResNet block {block!r}: use one of {', '.join(BLOCKS)}")
    if len(stage_sizes) != len(channels):
        raise ValueError(f"stage_sizes {tuple(stage_sizes)} and channels {tuple(channels)} differ in length")
    return ResNet(
        BLOCKS[block],
        tuple(stage_sizes),
        groups,
        width_per_group,
        num_classes,
        deep_stem,
        stem_width,
        avg_down,
        tuple(channels),
    )


# timm's builders (timm 1.0 ``resnet*``): block, layers, and the ResNet-D options.
_D = dict(deep_stem=True, stem_width=32, avg_down=True)
TIMM_SETTINGS: dict[str, dict[str, Any]] = {
    "timm/resnet18": dict(block="basic", stage_sizes=(2, 2, 2, 2)),
    "timm/resnet34": dict(block="basic", stage_sizes=(3, 4, 6, 3)),
    "timm/resnet50": dict(block="bottleneck", stage_sizes=(3, 4, 6, 3)),
    "timm/resnet101": dict(block="bottleneck", stage_sizes=(3, 4, 23, 3)),
    "timm/resnet152": dict(block="bottleneck", stage_sizes=(3, 8, 36, 3)),
    "timm/resnet18d": dict(block="basic", stage_sizes=(2, 2, 2, 2), **_D),
    "timm/resnet34d": dict(block="basic", stage_sizes=(3, 4, 6, 3), **_D),
    "timm/resnet50d": dict(block="bottleneck", stage_sizes=(3, 4, 6, 3), **_D),
    "timm/resnet101d": dict(block="bottleneck", stage_sizes=(3, 4, 23, 3), **_D),
    "timm/resnet152d": dict(block="bottleneck", stage_sizes=(3, 8, 36, 3), **_D),
}
# Every option of timm_resnet, at its default, for comparing a module's options with a named model's.
_TIMM_DEFAULTS = dict(
    deep_stem=False, stem_width=32, avg_down=False, channels=(64, 128, 256, 512), groups=1, width_per_group=64
)

# The pretrained_cfg of each name's default weights (timm 1.0.31, read once): crop = input size,
# resize = floor(crop / crop_pct), bicubic; ImageNet's mean and std.
# resnet18-152: a1_in1k / a1h_in1k (crop_pct 0.95); 18d-50d: ra2_in1k (224, 0.875); 101d, 152d: ra2_in1k (256, 0.95).
TIMM_PREPROCESSING = {
    **{f"timm/resnet{d}": Preprocessing(224, 235, "bicubic") for d in (18, 34, 50, 101, 152)},
    **{f"timm/resnet{d}d": Preprocessing(224, 256, "bicubic") for d in (18, 34, 50)},
    **{f"timm/resnet{d}d": Preprocessing(256, 269, "bicubic") for d in (101, 152)},
}

ARCHITECTURES = {
    "resnet18": functools.partial(ResNet, BasicBlock, (2, 2, 2, 2)),
    "resnet34": functools.partial(ResNet, BasicBlock, (3, 4, 6, 3)),
    "resnet50": functools.partial(ResNet, Bottleneck, (3, 4, 6, 3)),
    "resnet101": functools.partial(ResNet, Bottleneck, (3, 4, 23, 3)),
    "resnet152": functools.partial(ResNet, Bottleneck, (3, 8, 36, 3)),
    "resnext50_32x4d": functools.partial(ResNet, Bottleneck, (3, 4, 6, 3), groups=32, width_per_group=4),
    "resnext101_32x8d": functools.partial(ResNet, Bottleneck, (3, 4, 23, 3), groups=32, width_per_group=8),
    "resnext101_64x4d": functools.partial(ResNet, Bottleneck, (3, 4, 23, 3), groups=64, width_per_group=4),
    "wide_resnet50_2": functools.partial(ResNet, Bottleneck, (3, 4, 6, 3), width_per_group=128),
    "wide_resnet101_2": functools.partial(ResNet, Bottleneck, (3, 4, 23, 3), width_per_group=128),
    **{arch: functools.partial(timm_resnet, **s) for arch, s in TIMM_SETTINGS.items()},
}


def _bottleneck(builder) -> bool:
    """Whether a builder of ``ARCHITECTURES`` makes Bottleneck blocks (torchvision's or timm's)."""
    return (builder.args and builder.args[0] is Bottleneck) or builder.keywords.get("block") == "bottleneck"


def torch_config(module) -> dict:
    """The builder options of a timm ``ResNet`` (``timm.models.resnet``) beyond a named model's:
    ``{}`` for the named models' sizes, every :func:`timm_resnet` option otherwise (the tests'
    small ones); ``{}`` for a torchvision ResNet (its sizes are its name's).

    Raises:
      ValueError: a timm option this port does not compute, named (SE / attention blocks,
        anti-aliasing, a replaced stem pool, the tiered deep stem, dilation, a 3x3 shortcut,
        ``block_reduce_first``, another activation, norm or global pool).
    """
    if not type(module).__module__.startswith("timm."):
        return {}
    from torch import nn as tnn

    def refuse(what: str, fix: str) -> NoReturn:
        raise ValueError(f"this timm ResNet has {what}, which jaxpull's ResNet does not compute: {fix}")

    stages: list[Any] = [getattr(module, f"layer{i}", None) for i in range(1, 6)]  # torch modules
    if any(s is None for s in stages[:4]) or stages[4] is not None:
        refuse("another number of stages than 4", "use timm's resnet* layout (layer1 ... layer4)")
    stages = stages[:4]
    blocks = [b for s in stages for b in s]
    kinds = {type(b).__name__ for b in blocks}
    if len(kinds) != 1 or not kinds <= {"BasicBlock", "Bottleneck"}:
        refuse(f"blocks {sorted(kinds)}", "use timm's BasicBlock or Bottleneck")
    bottleneck = kinds == {"Bottleneck"}
    if getattr(module.global_pool, "pool_type", None) != "avg" or not isinstance(module.fc, tnn.Linear):
        refuse("another global pool or classifier", "build it with global_pool='avg' and num_classes > 0")
    if not isinstance(module.maxpool, tnn.MaxPool2d):
        refuse("a replaced or anti-aliased stem pool", "build it without replace_stem_pool and aa_layer")
    deep = isinstance(module.conv1, tnn.Sequential)
    acts = [module.act1] + ([module.conv1[2], module.conv1[5]] if deep else [])
    acts += [getattr(b, f"act{k}") for b in blocks for k in (1, 2, 3) if hasattr(b, f"act{k}")]
    if any(type(a) is not tnn.ReLU for a in acts):
        refuse("an activation other than ReLU", "build it with act_layer=nn.ReLU")
    norms = [m for m in module.modules() if isinstance(m, (tnn.BatchNorm2d, tnn.GroupNorm, tnn.LayerNorm))]
    if any(type(m) is not tnn.BatchNorm2d or m.eps != 1e-5 for m in norms):
        refuse("another norm layer or BatchNorm eps", "build it with norm_layer=nn.BatchNorm2d")
    for b in blocks:
        if b.se is not None or not isinstance(b.aa, tnn.Identity) or b.conv2.dilation != (1, 1):
            refuse("squeeze-excitation, anti-aliasing or dilation in its blocks", "use a plain timm resnet*")
        if b.downsample is not None and b.downsample[-2].kernel_size != (1, 1):
            refuse("a 3x3 shortcut convolution (down_kernel_size=3)", "build it with down_kernel_size=1")
        if b.conv1.out_channels != b.conv2.out_channels:  # timm: conv1 of planes // reduce_first
            refuse("a reduced first convolution (block_reduce_first)", "build it with block_reduce_first=1")
    if deep and module.conv1[0].out_channels != module.conv1[3].out_channels:
        refuse("the tiered deep stem (stem_type='deep_tiered')", "use stem_type='' or 'deep'")
    channels = tuple(int(s[0].conv3.out_channels // 4 if bottleneck else s[0].conv2.out_channels) for s in stages)
    groups = int(blocks[0].conv2.groups)
    width = int(blocks[0].conv2.out_channels)
    width_per_group = width * 64 // (channels[0] * groups) if bottleneck else 64
    if bottleneck and any(
        int(c * (width_per_group / 64.0)) * groups != s[0].conv2.out_channels
        for c, s in zip(channels, stages, strict=True)
    ):
        refuse("bottleneck widths no base_width reproduces", "use a whole-number base_width")
    options = dict(
        block="bottleneck" if bottleneck else "basic",
        stage_sizes=tuple(len(s) for s in stages),
        deep_stem=deep,
        stem_width=int(module.conv1[0].out_channels) if deep else 32,
        avg_down=any(b.downsample is not None and len(b.downsample) == 3 for b in blocks),
        channels=channels,
        groups=groups,
        width_per_group=width_per_group,
    )
    named = [{**_TIMM_DEFAULTS, **s} for s in TIMM_SETTINGS.values()]
    return {} if options in named else options


def torch_layout(arch: str, sd, **config) -> dict:
    """Map a torchvision or timm ResNet state_dict onto this module's parameter tree.

    ``sd`` is a :class:`jaxpull_convert.StateDict` reader: it transposes kernels, folds each
    BatchNorm and records missing and unused keys. ``config``: :func:`timm_resnet`'s options of a
    timm model of other sizes (``torch_config``); the deep stem and ``avg_down`` shortcuts follow
    the options (timm's keys ``conv1.0`` ... and ``downsample.1`` / ``downsample.2``).
    """
    options = {**_TIMM_DEFAULTS, **TIMM_SETTINGS.get(arch, {}), **config}
    if options["deep_stem"]:
        p = {
            "conv1_0": sd.conv_bn("conv1.0", "conv1.1"),
            "conv1_3": sd.conv_bn("conv1.3", "conv1.4"),
            "conv1_6": sd.conv_bn("conv1.6", "bn1"),
        }
    else:
        p = {"conv1": sd.conv_bn("conv1", "bn1")}
    p["fc"] = sd.dense("fc")
    shortcut = ("downsample.1", "downsample.2") if options["avg_down"] else ("downsample.0", "downsample.1")
    for stage in range(1, 5):
        layer = {}
        i = 0
        while sd.has(f"layer{stage}.{i}.conv1.weight"):
            pre = f"layer{stage}.{i}"
            block = {}
            j = 1
            while sd.has(f"{pre}.conv{j}.weight"):
                block[f"conv{j}"] = sd.conv_bn(f"{pre}.conv{j}", f"{pre}.bn{j}")
                j += 1
            if any(sd.has(f"{pre}.downsample.{k}.weight") for k in range(3)):
                block["downsample"] = sd.conv_bn(f"{pre}.{shortcut[0]}", f"{pre}.{shortcut[1]}")
            layer[str(i)] = block
            i += 1
        p[f"layer{stage}"] = layer
    return p


# ModelSpec.config: timm_resnet's options of a timm model of other sizes (torch_config)
CONFIG_OPTIONS = {
    "block": Literal["basic", "bottleneck"],
    "stage_sizes": tuple[options.COUNT, ...],
    "deep_stem": bool,
    "stem_width": int,
    "avg_down": bool,
    "channels": tuple[int, ...],
    "groups": int,
    "width_per_group": int,
}
CLASSIFIER = "fc"  # the logits' layer in the state_dict: the number of classes is its weight's rows


FAMILY = Family(
    architectures=ARCHITECTURES,
    torch_layout=torch_layout,
    max_pools=True,
    classifier=CLASSIFIER,
    preprocessing=TIMM_PREPROCESSING,
    torch_config=torch_config,
    config_options=CONFIG_OPTIONS,
    # the paper's layer4[-1].conv3 (torch's convolution, before bn3); resnet18/34 blocks end in conv2
    gradcam_layer={
        a: GradCamLayer(f"layer4.-1.conv{3 if _bottleneck(b) else 2}", True) for a, b in ARCHITECTURES.items()
    },
)
