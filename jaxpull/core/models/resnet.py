"""torchvision's ResNet family: resnet18/34/50/101/152, resnext50_32x4d, resnext101_32x8d,
resnext101_64x4d, wide_resnet50_2, wide_resnet101_2.

Module and parameter names follow torchvision's (``layer1/0/conv1``), with each convolution's
BatchNorm folded into it (``bn1`` lives inside ``conv1`` as its bias and scaled kernel).
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax

from jaxpull.core.rules import Rules
from jaxpull.core.layers import Conv, Dense, global_avg_pool
from jaxpull.core.models.family import Family, GradCamLayer


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a residual connection (resnet18/34)."""

    planes: int
    stride: int = 1
    downsample: bool = False
    groups: int = 1
    base_width: int = 64
    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        identity = x
        y = Conv(self.planes, 3, self.stride, 1, use_bias=True, name="conv1")(x)
        y = rules.relu(y)
        y = Conv(self.planes, 3, 1, 1, use_bias=True, name="conv2")(y)
        if self.downsample:
            identity = Conv(self.planes, 1, self.stride, 0, use_bias=True, name="downsample")(x)
        return rules.relu(y + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (grouped, strided) -> 1x1 convolutions and a residual connection."""

    planes: int
    stride: int = 1
    downsample: bool = False
    groups: int = 1
    base_width: int = 64
    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        width = int(self.planes * (self.base_width / 64.0)) * self.groups
        identity = x
        y = rules.relu(Conv(width, 1, 1, 0, use_bias=True, name="conv1")(x))
        y = rules.relu(Conv(width, 3, self.stride, 1, self.groups, use_bias=True, name="conv2")(y))
        y = Conv(self.planes * 4, 1, 1, 0, use_bias=True, name="conv3")(y)
        if self.downsample:
            identity = Conv(self.planes * 4, 1, self.stride, 0, use_bias=True, name="downsample")(x)
        return rules.relu(y + identity)


class Stage(nn.Module):
    """torchvision's ``layerN``: a sequence of blocks named ``0``, ``1``, ..."""

    block: type
    planes: int
    blocks: int
    stride: int
    downsample: bool
    groups: int
    base_width: int

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        for i in range(self.blocks):
            x = self.block(
                self.planes,
                self.stride if i == 0 else 1,
                self.downsample and i == 0,
                self.groups,
                self.base_width,
                name=str(i),
            )(x, rules)
        return x


class ResNet(nn.Module):
    """torchvision ``ResNet``: stem, four stages, global average pool, ``fc``."""

    block: type
    stage_sizes: Sequence[int]
    groups: int = 1
    width_per_group: int = 64
    num_classes: int = 1000

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        x = rules.relu(Conv(64, 7, 2, 3, use_bias=True, name="conv1")(x))
        x = rules.max_pool(x, 3, 2, 1)
        inplanes = 64
        for i, n in enumerate(self.stage_sizes):
            planes = 64 * 2**i
            stride = 1 if i == 0 else 2
            downsample = stride != 1 or inplanes != planes * self.block.expansion
            x = Stage(
                self.block, planes, n, stride, downsample, self.groups, self.width_per_group, name=f"layer{i + 1}"
            )(x, rules)
            inplanes = planes * self.block.expansion
        return Dense(self.num_classes, name="fc")(global_avg_pool(x))


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
}


def torch_layout(arch: str, sd) -> dict:
    """Map a torchvision ResNet state_dict onto this module's parameter tree.

    ``sd`` is a :class:`jaxpull_convert.StateDict` reader: it transposes kernels, folds each
    BatchNorm and records missing and unused keys.
    """
    p = {"conv1": sd.conv_bn("conv1", "bn1"), "fc": sd.dense("fc")}
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
            if sd.has(f"{pre}.downsample.0.weight"):
                block["downsample"] = sd.conv_bn(f"{pre}.downsample.0", f"{pre}.downsample.1")
            layer[str(i)] = block
            i += 1
        p[f"layer{stage}"] = layer
    return p


FAMILY = Family(
    architectures=ARCHITECTURES,
    torch_layout=torch_layout,
    max_pools=True,
    # the paper's layer4[-1].conv3 (torch's convolution, before bn3); resnet18/34 blocks end in conv2
    gradcam_layer={
        a: GradCamLayer(f"layer4.-1.conv{3 if b.args[0] is Bottleneck else 2}", True) for a, b in ARCHITECTURES.items()
    },
)
