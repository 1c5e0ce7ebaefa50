"""EfficientNet-Lite0 (the ``efficientnet-lite-pytorch`` port of Google's TensorFlow model).

A ReLU6 network without squeeze-excitation. Its convolutions pad TensorFlow-style ('same',
the extra pixel after, for stride 2), computed here from the actual input size. Its BatchNorm
epsilon is 1e-3, and the TensorFlow model was trained on pixels normalised as (p - 127) / 128,
which the converter records as the file's input normalisation.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from jaxpull.core.layers import Conv, Dense, global_avg_pool
from jaxpull.core.models.family import Family, GradCamLayer
from jaxpull.core.rules import Rules

# (repeats, kernel, first stride, expansion, input channels, output channels): lite0's blocks_args
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
BN_EPS = 1e-3
INPUT_MEAN = (127.0 / 255,) * 3  # (p/255 - 127/255) / (128/255) == (p - 127) / 128
INPUT_STD = (128.0 / 255,) * 3
INPUT_NORMALIZATION = (INPUT_MEAN, INPUT_STD)


def blocks():
    """Yield ``(block index, kernel, stride, expansion, input channels, output channels)``."""
    index = 0
    for repeats, kernel, stride, expand, inp, oup in STAGES:
        for i in range(repeats):
            yield index, kernel, stride if i == 0 else 1, expand, inp if i == 0 else oup, oup
            index += 1


class MBConv(nn.Module):
    """Mobile inverted bottleneck: [1x1 expand] -> depthwise kxk -> 1x1 project (+ skip)."""

    kernel: int
    stride: int
    expand: int
    inp: int
    oup: int

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        hidden = self.inp * self.expand
        y = x
        if self.expand != 1:
            y = rules.relu(Conv(hidden, 1, use_bias=True, name="expand_conv")(y), max_value=6)
        y = Conv(hidden, self.kernel, self.stride, "same", groups=hidden, use_bias=True, name="depthwise_conv")(y)
        y = rules.relu(y, max_value=6)
        y = Conv(self.oup, 1, use_bias=True, name="project_conv")(y)
        return x + y if self.stride == 1 and self.inp == self.oup else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0: 'same'-padded stem, 16 MBConv blocks, 1x1 head to 1280, linear."""

    num_classes: int = 1000

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        x = rules.relu(Conv(32, 3, 2, "same", use_bias=True, name="conv_stem")(x), max_value=6)
        for index, kernel, stride, expand, inp, oup in blocks():
            x = MBConv(kernel, stride, expand, inp, oup, name=f"blocks_{index}")(x, rules)
        x = rules.relu(Conv(1280, 1, use_bias=True, name="conv_head")(x), max_value=6)
        return Dense(self.num_classes, name="fc")(global_avg_pool(x))


ARCHITECTURES = {"efficientnet_lite0": EfficientNetLite}


def torch_layout(arch: str, sd) -> dict:
    """Map the ``efficientnet-lite-pytorch`` state_dict onto this module's parameter tree."""
    p = {
        "conv_stem": sd.conv_bn("_conv_stem", "_bn0", BN_EPS),
        "conv_head": sd.conv_bn("_conv_head", "_bn1", BN_EPS),
        "fc": sd.dense("_fc"),
    }
    for index, _, _, expand, _, _ in blocks():
        b = f"_blocks.{index}"
        block = {
            "depthwise_conv": sd.conv_bn(f"{b}._depthwise_conv", f"{b}._bn1", BN_EPS),
            "project_conv": sd.conv_bn(f"{b}._project_conv", f"{b}._bn2", BN_EPS),
        }
        if expand != 1:
            block["expand_conv"] = sd.conv_bn(f"{b}._expand_conv", f"{b}._bn0", BN_EPS)
        p[f"blocks_{index}"] = block
    return p


CLASSIFIER = "_fc"  # the logits' layer in the state_dict: the number of classes is its weight's rows


FAMILY = Family(
    architectures=ARCHITECTURES,
    torch_layout=torch_layout,
    max_pools=False,
    input_normalization=INPUT_NORMALIZATION,
    classifier=CLASSIFIER,
    gradcam_layer=GradCamLayer("conv_head", before_batchnorm=True),  # the last convolution
)
