"""torchvision's ShuffleNetV2: shufflenet_v2_x0_5, shufflenet_v2_x1_0, shufflenet_v2_x1_5, shufflenet_v2_x2_0.

Stem conv + ReLU, a 3x3/2 max-pool (padding 1, floor mode), three stages of two-branch units and
a 1x1 conv to the classifier. A unit with stride 1 splits its channels in two halves (torch's
``chunk(2, dim=1)``: the first half passes through, the second goes through ``branch2``); a
strided unit feeds the whole input to both branches. Both concatenate in torch's channel order
and end with ``channel_shuffle(out, 2)``. Names are torchvision's with indices joined by ``_``
(``stage2_0/branch2_3`` is ``stage2.0.branch2.3``), each BatchNorm folded into the convolution
before it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpull.core.layers import Conv, Dense, global_avg_pool
from jaxpull.core.models.family import Family, GradCamLayer
from jaxpull.core.rules import Rules


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
    """torchvision's ``channel_shuffle`` on ``(N, H, W, C)``: output channel ``j * groups + g`` is
    input channel ``g * (C // groups) + j``."""
    n, h, w, c = x.shape
    x = x.reshape(n, h, w, groups, c // groups)
    return jnp.swapaxes(x, 3, 4).reshape(n, h, w, c)


class InvertedResidual(nn.Module):
    """One ShuffleNetV2 unit: (identity | ``branch1``) and ``branch2``, concatenated, shuffled."""

    oup: int
    stride: int

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        branch_features = self.oup // 2
        inp = x.shape[-1]
        if self.stride == 1:  # torch's x.chunk(2, dim=1)
            x1, x2 = x[..., :branch_features], x[..., branch_features:]
        else:
            # branch1: depthwise 3x3 (strided) -> 1x1 + ReLU
            x1 = Conv(inp, 3, self.stride, 1, groups=inp, use_bias=True, name="branch1_0")(x)
            x1 = rules.relu(Conv(branch_features, 1, use_bias=True, name="branch1_2")(x1))
            x2 = x
        # branch2: 1x1 + ReLU -> depthwise 3x3 (strided) -> 1x1 + ReLU
        y = rules.relu(Conv(branch_features, 1, use_bias=True, name="branch2_0")(x2))
        y = Conv(branch_features, 3, self.stride, 1, groups=branch_features, use_bias=True, name="branch2_3")(y)
        y = rules.relu(Conv(branch_features, 1, use_bias=True, name="branch2_5")(y))
        return channel_shuffle(jnp.concatenate([x1, y], axis=-1), 2)


class ShuffleNetV2(nn.Module):
    """torchvision ``ShuffleNetV2``: conv1, max-pool, stage2-4, conv5, global average pool, ``fc``."""

    stages_repeats: Sequence[int]
    stages_out_channels: Sequence[int]
    num_classes: int = 1000

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        x = rules.relu(Conv(self.stages_out_channels[0], 3, 2, 1, use_bias=True, name="conv1")(x))
        x = rules.max_pool(x, 3, 2, 1)
        # strict=False: stages_out_channels ends with conv5's width, after the stages' widths
        for i, (repeats, oup) in enumerate(zip(self.stages_repeats, self.stages_out_channels[1:], strict=False)):
            for j in range(repeats):
                x = InvertedResidual(oup, 2 if j == 0 else 1, name=f"stage{i + 2}_{j}")(x, rules)
        x = rules.relu(Conv(self.stages_out_channels[-1], 1, use_bias=True, name="conv5")(x))
        return Dense(self.num_classes, name="fc")(global_avg_pool(x))


ARCHITECTURES = {
    "shufflenet_v2_x0_5": functools.partial(ShuffleNetV2, (4, 8, 4), (24, 48, 96, 192, 1024)),
    "shufflenet_v2_x1_0": functools.partial(ShuffleNetV2, (4, 8, 4), (24, 116, 232, 464, 1024)),
    "shufflenet_v2_x1_5": functools.partial(ShuffleNetV2, (4, 8, 4), (24, 176, 352, 704, 1024)),
    "shufflenet_v2_x2_0": functools.partial(ShuffleNetV2, (4, 8, 4), (24, 244, 488, 976, 2048)),
}


def torch_layout(arch: str, sd) -> dict:
    """Map a torchvision ShuffleNetV2 state_dict onto this module's parameter tree."""
    p = {"conv1": sd.conv_bn("conv1.0", "conv1.1"), "conv5": sd.conv_bn("conv5.0", "conv5.1"), "fc": sd.dense("fc")}
    for stage in (2, 3, 4):
        i = 0
        while sd.has(f"stage{stage}.{i}.branch2.0.weight"):
            pre = f"stage{stage}.{i}"
            unit = {f"branch2_{k}": sd.conv_bn(f"{pre}.branch2.{k}", f"{pre}.branch2.{k + 1}") for k in (0, 3, 5)}
            if sd.has(f"{pre}.branch1.0.weight"):
                unit["branch1_0"] = sd.conv_bn(f"{pre}.branch1.0", f"{pre}.branch1.1")
                unit["branch1_2"] = sd.conv_bn(f"{pre}.branch1.2", f"{pre}.branch1.3")
            p[f"stage{stage}_{i}"] = unit
            i += 1
    return p


CLASSIFIER = "fc"  # the logits' layer in the state_dict: the number of classes is its weight's rows


FAMILY = Family(
    architectures=ARCHITECTURES,
    torch_layout=torch_layout,
    max_pools=True,
    classifier=CLASSIFIER,
    gradcam_layer=GradCamLayer("conv5", before_batchnorm=True),  # the last convolution (conv5.0)
)
