"""torchvision's RegNet family: regnet_x_400mf ... regnet_x_32gf, regnet_y_400mf ... regnet_y_128gf.

Each network is a 3x3 stem, four stages of residual bottleneck blocks (1x1 -> grouped 3x3
[-> squeeze-excitation] -> 1x1, plus the input or its 1x1 projection, then ReLU), a global
average pool and ``fc``. The per-stage widths, depths and group widths come from the RegNet
parameters (depth, w_0, w_a, w_m, group width) exactly as torchvision's
``BlockParams.from_init_params`` computes them (float32, as torch does), here in numpy.

RegNetY adds squeeze-excitation: its ReLU is an excitation gate like every other; its sigmoid
scale and the product with the input keep their plain derivative (docs/method.md). Module names
follow torchvision's (``block1/block1-0/f/a``), each BatchNorm folded into its convolution.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import numpy as np

from jaxpull.core.layers import Conv, Dense, SqueezeExcitation, global_avg_pool
from jaxpull.core.models.family import Family, GradCamLayer
from jaxpull.core.rules import Rules


class Stage(NamedTuple):
    """One stage's settings: output width, depth (blocks), group width, bottleneck multiplier."""

    width: int
    depth: int
    group_width: int
    bottleneck_multiplier: float


def _make_divisible(v: float, divisor: int) -> int:
    """torchvision's ``_make_divisible`` (min_value = divisor): round to a multiple, at most 10% down."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def block_params(
    depth: int, w_0: int, w_a: float, w_m: float, group_width: int, bottleneck_multiplier: float = 1.0
) -> tuple[Stage, ...]:
    """The stages of a RegNet, as torchvision's ``BlockParams.from_init_params`` computes them.

    Block widths ``w_0 + w_a * i`` are quantised in log space (base ``w_m``) and to multiples
    of 8 in float32 (torch's default dtype); runs of equal width form the stages; then stage and
    group widths are made compatible (``_adjust_widths_groups_compatibilty``).
    """
    if w_a < 0 or w_0 <= 0 or w_m <= 1 or w_0 % 8 != 0:
        raise ValueError(
            f"invalid RegNet settings w_0={w_0}, w_a={w_a}, w_m={w_m}: need w_a >= 0, "
            "w_m > 1 and w_0 a positive multiple of 8"
        )
    f32 = np.float32
    widths_cont = np.arange(depth, dtype=f32) * f32(w_a) + f32(w_0)
    block_capacity = np.round(np.log(widths_cont / f32(w_0)) / f32(math.log(w_m)))
    block_widths = (np.round(f32(w_0) * np.power(f32(w_m), block_capacity) / f32(8)) * 8).astype(np.int64)
    # a new stage starts wherever the block width changes
    starts = [i for i in range(depth) if i == 0 or block_widths[i] != block_widths[i - 1]] + [depth]
    stages = []
    for lo, hi in zip(starts[:-1], starts[1:], strict=True):
        width = int(block_widths[lo])
        w_bot = int(width * bottleneck_multiplier)
        g = min(group_width, w_bot)
        w_bot = _make_divisible(w_bot, g)
        stages.append(Stage(int(w_bot / bottleneck_multiplier), hi - lo, g, bottleneck_multiplier))
    return tuple(stages)


class BottleneckTransform(nn.Module):
    """``f``: 1x1 ``a`` -> grouped 3x3 ``b`` (strided) [-> ``se``] -> 1x1 ``c`` (no ReLU)."""

    width_out: int
    stride: int
    group_width: int
    bottleneck_multiplier: float
    se_ratio: float | None

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        w_b = int(round(self.width_out * self.bottleneck_multiplier))
        groups = w_b // self.group_width
        y = rules.relu(Conv(w_b, 1, use_bias=True, name="a")(x))
        y = rules.relu(Conv(w_b, 3, self.stride, 1, groups, use_bias=True, name="b")(y))
        if self.se_ratio:
            # the SE reduction is relative to the block's input width
            y = SqueezeExcitation(int(round(self.se_ratio * x.shape[-1])), "relu", name="se")(y, rules)
        return Conv(self.width_out, 1, use_bias=True, name="c")(y)


class ResBottleneckBlock(nn.Module):
    """``relu(x + f(x))``, with ``x`` projected (1x1 ``proj``) when the shape changes."""

    width_out: int
    stride: int
    group_width: int
    bottleneck_multiplier: float
    se_ratio: float | None

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        f = BottleneckTransform(
            self.width_out, self.stride, self.group_width, self.bottleneck_multiplier, self.se_ratio, name="f"
        )(x, rules)
        if x.shape[-1] != self.width_out or self.stride != 1:
            x = Conv(self.width_out, 1, self.stride, use_bias=True, name="proj")(x)
        return rules.relu(x + f)


class AnyStage(nn.Module):
    """``blockN``: ``depth`` blocks named ``blockN-0``, ``blockN-1``, ...; the first one strides."""

    stage: Stage
    stage_index: int
    se_ratio: float | None

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        s = self.stage
        for i in range(s.depth):
            x = ResBottleneckBlock(
                s.width,
                2 if i == 0 else 1,
                s.group_width,
                s.bottleneck_multiplier,
                self.se_ratio,
                name=f"block{self.stage_index}-{i}",
            )(x, rules)
        return x


class RegNet(nn.Module):
    """torchvision ``RegNet``: 3x3/2 stem (32 channels), four stages, global average pool, ``fc``."""

    stages: tuple[Stage, ...]
    se_ratio: float | None = None
    stem_width: int = 32
    num_classes: int = 1000

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        x = rules.relu(Conv(self.stem_width, 3, 2, 1, use_bias=True, name="stem")(x))
        for i, stage in enumerate(self.stages):
            x = AnyStage(stage, i + 1, self.se_ratio, name=f"block{i + 1}")(x, rules)
        return Dense(self.num_classes, name="fc")(global_avg_pool(x))


def _regnet(depth: int, w_0: int, w_a: float, w_m: float, group_width: int, se_ratio: float | None = None):
    return functools.partial(RegNet, block_params(depth, w_0, w_a, w_m, group_width), se_ratio)


# torchvision's (depth, w_0, w_a, w_m, group_width[, se_ratio]) of each model
ARCHITECTURES = {
    "regnet_y_400mf": _regnet(16, 48, 27.89, 2.09, 8, 0.25),
    "regnet_y_800mf": _regnet(14, 56, 38.84, 2.4, 16, 0.25),
    "regnet_y_1_6gf": _regnet(27, 48, 20.71, 2.65, 24, 0.25),
    "regnet_y_3_2gf": _regnet(21, 80, 42.63, 2.66, 24, 0.25),
    "regnet_y_8gf": _regnet(17, 192, 76.82, 2.19, 56, 0.25),
    "regnet_y_16gf": _regnet(18, 200, 106.23, 2.48, 112, 0.25),
    "regnet_y_32gf": _regnet(20, 232, 115.89, 2.53, 232, 0.25),
    "regnet_y_128gf": _regnet(27, 456, 160.83, 2.52, 264, 0.25),
    "regnet_x_400mf": _regnet(22, 24, 24.48, 2.54, 16),
    "regnet_x_800mf": _regnet(16, 56, 35.73, 2.28, 16),
    "regnet_x_1_6gf": _regnet(18, 80, 34.01, 2.25, 24),
    "regnet_x_3_2gf": _regnet(25, 88, 26.31, 2.25, 48),
    "regnet_x_8gf": _regnet(23, 80, 49.56, 2.88, 120),
    "regnet_x_16gf": _regnet(22, 216, 55.59, 2.1, 128),
    "regnet_x_32gf": _regnet(23, 320, 69.86, 2.0, 168),
}


def torch_layout(arch: str, sd) -> dict:
    """Map a torchvision RegNet state_dict onto this module's parameter tree."""
    p = {"stem": sd.conv_bn("stem.0", "stem.1"), "fc": sd.dense("fc")}
    s = 1
    while sd.has(f"trunk_output.block{s}.block{s}-0.f.a.0.weight"):
        stage, i = {}, 0
        while sd.has(f"trunk_output.block{s}.block{s}-{i}.f.a.0.weight"):
            pre = f"trunk_output.block{s}.block{s}-{i}"
            f = {name: sd.conv_bn(f"{pre}.f.{name}.0", f"{pre}.f.{name}.1") for name in ("a", "b", "c")}
            if sd.has(f"{pre}.f.se.fc1.weight"):
                f["se"] = {"fc1": sd.conv_bn(f"{pre}.f.se.fc1", None), "fc2": sd.conv_bn(f"{pre}.f.se.fc2", None)}
            block = {"f": f}
            if sd.has(f"{pre}.proj.0.weight"):
                block["proj"] = sd.conv_bn(f"{pre}.proj.0", f"{pre}.proj.1")
            stage[f"block{s}-{i}"] = block
            i += 1
        p[f"block{s}"] = stage
        s += 1
    return p


CLASSIFIER = "fc"  # the logits' layer in the state_dict: the number of classes is its weight's rows


FAMILY = Family(
    architectures=ARCHITECTURES,
    torch_layout=torch_layout,
    max_pools=False,
    classifier=CLASSIFIER,
    gradcam_layer=GradCamLayer("block4"),  # trunk_output.block4: the last feature map
)
