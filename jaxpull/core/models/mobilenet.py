"""torchvision's MobileNetV2 (ReLU6 network; inverted residual blocks)."""

from __future__ import annotations

import flax.linen as nn
import jax

from jaxpull.core.layers import Conv, Dense, global_avg_pool
from jaxpull.core.models.family import Family, GradCamLayer
from jaxpull.core.rules import Rules

# (expansion t, output channels c, repeats n, first stride s), as torchvision's table
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def blocks():
    """Yield ``(features index, input channels, output channels, stride, expansion)``."""
    index, inp = 1, 32
    for t, c, n, s in SETTINGS:
        for i in range(n):
            yield index, inp, c, s if i == 0 else 1, t
            index, inp = index + 1, c


class InvertedResidual(nn.Module):
    """[1x1 expand + ReLU6] -> 3x3 depthwise + ReLU6 -> 1x1 linear projection (+ residual)."""

    inp: int
    oup: int
    stride: int
    expand: int

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        hidden = self.inp * self.expand
        y = x
        if self.expand != 1:
            y = rules.relu(Conv(hidden, 1, use_bias=True, name="expand")(y), max_value=6)
        y = rules.relu(Conv(hidden, 3, self.stride, 1, groups=hidden, use_bias=True, name="depthwise")(y), max_value=6)
        y = Conv(self.oup, 1, use_bias=True, name="project")(y)
        return x + y if self.stride == 1 and self.inp == self.oup else y


class MobileNetV2(nn.Module):
    """torchvision ``MobileNetV2`` (width 1.0): stem, 17 inverted residuals, 1x1 head, linear."""

    num_classes: int = 1000

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        x = rules.relu(Conv(32, 3, 2, 1, use_bias=True, name="features_0")(x), max_value=6)
        for index, inp, oup, stride, expand in blocks():
            x = InvertedResidual(inp, oup, stride, expand, name=f"features_{index}")(x, rules)
        x = rules.relu(Conv(1280, 1, use_bias=True, name="features_18")(x), max_value=6)
        return Dense(self.num_classes, name="classifier_1")(global_avg_pool(x))


ARCHITECTURES = {"mobilenet_v2": MobileNetV2}


def torch_layout(arch: str, sd) -> dict:
    """Map a torchvision MobileNetV2 state_dict onto this module's parameter tree."""
    p = {
        "features_0": sd.conv_bn("features.0.0", "features.0.1"),
        "features_18": sd.conv_bn("features.18.0", "features.18.1"),
        "classifier_1": sd.dense("classifier.1"),
    }
    for index, _, _, _, expand in blocks():
        c = f"features.{index}.conv"
        if expand == 1:
            p[f"features_{index}"] = {
                "depthwise": sd.conv_bn(f"{c}.0.0", f"{c}.0.1"),
                "project": sd.conv_bn(f"{c}.1", f"{c}.2"),
            }
        else:
            p[f"features_{index}"] = {
                "expand": sd.conv_bn(f"{c}.0.0", f"{c}.0.1"),
                "depthwise": sd.conv_bn(f"{c}.1.0", f"{c}.1.1"),
                "project": sd.conv_bn(f"{c}.2", f"{c}.3"),
            }
    return p


CLASSIFIER = "classifier.1"  # the logits' layer in the state_dict: the number of classes is its weight's rows


FAMILY = Family(
    architectures=ARCHITECTURES,
    torch_layout=torch_layout,
    max_pools=False,
    classifier=CLASSIFIER,
    gradcam_layer=GradCamLayer("features.18", before_batchnorm=True),  # the last convolution (features.18.0)
)
