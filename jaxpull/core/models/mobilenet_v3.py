"""torchvision's MobileNetV3: mobilenet_v3_small and mobilenet_v3_large (width 1.0).

A ReLU / Hardswish network of inverted residual blocks, some with squeeze-excitation. Every ReLU
(including the SE blocks') and every Hardswish is gated; the SE scale (Hardsigmoid) and the
product keep their plain derivative. ``features_N`` are torchvision's ``features.N`` (BatchNorm,
epsilon 1e-3 here, folded into each convolution); ``classifier_0``/``_3`` its linear layers
(dropout is the identity in eval mode).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax

from jaxpull.core.gates import hardsigmoid
from jaxpull.core.layers import Conv, Dense, SqueezeExcitation, global_avg_pool
from jaxpull.core.models.family import Family, GradCamLayer
from jaxpull.core.rules import Rules

BN_EPS = 1e-3

# torchvision's _mobilenet_v3_conf: (input channels, kernel, expanded channels, output channels,
# squeeze-excitation, activation, stride) for each block, and the classifier's hidden width.
SETTINGS = {
    "mobilenet_v3_large": (
        (16, 3, 16, 16, False, "RE", 1),
        (16, 3, 64, 24, False, "RE", 2),
        (24, 3, 72, 24, False, "RE", 1),
        (24, 5, 72, 40, True, "RE", 2),
        (40, 5, 120, 40, True, "RE", 1),
        (40, 5, 120, 40, True, "RE", 1),
        (40, 3, 240, 80, False, "HS", 2),
        (80, 3, 200, 80, False, "HS", 1),
        (80, 3, 184, 80, False, "HS", 1),
        (80, 3, 184, 80, False, "HS", 1),
        (80, 3, 480, 112, True, "HS", 1),
        (112, 3, 672, 112, True, "HS", 1),
        (112, 5, 672, 160, True, "HS", 2),
        (160, 5, 960, 160, True, "HS", 1),
        (160, 5, 960, 160, True, "HS", 1),
    ),
    "mobilenet_v3_small": (
        (16, 3, 16, 16, True, "RE", 2),
        (16, 3, 72, 24, False, "RE", 2),
        (24, 3, 88, 24, False, "RE", 1),
        (24, 5, 96, 40, True, "HS", 2),
        (40, 5, 240, 40, True, "HS", 1),
        (40, 5, 240, 40, True, "HS", 1),
        (40, 5, 120, 48, True, "HS", 1),
        (48, 5, 144, 48, True, "HS", 1),
        (48, 5, 288, 96, True, "HS", 2),
        (96, 5, 576, 96, True, "HS", 1),
        (96, 5, 576, 96, True, "HS", 1),
    ),
}
LAST_CHANNEL = {"mobilenet_v3_large": 1280, "mobilenet_v3_small": 1024}


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """torchvision's ``_make_divisible``: round to a multiple of ``divisor``, never below 90%."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


# torchvision's activation codes -> the rule (a field of Rules) of that activation
ACTIVATIONS = {"RE": "relu", "HS": "hardswish"}


class InvertedResidual(nn.Module):
    """[1x1 expand + act] -> kxk depthwise + act -> [SE] -> 1x1 linear projection (+ residual)."""

    inp: int
    kernel: int
    expanded: int
    out: int
    use_se: bool
    act: str
    stride: int

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        act = getattr(rules, ACTIVATIONS[self.act])
        y = x
        if self.expanded != self.inp:
            y = act(Conv(self.expanded, 1, use_bias=True, name="expand")(y))
        y = Conv(
            self.expanded,
            self.kernel,
            self.stride,
            (self.kernel - 1) // 2,
            groups=self.expanded,
            use_bias=True,
            name="depthwise",
        )(y)
        y = act(y)
        if self.use_se:
            y = SqueezeExcitation(make_divisible(self.expanded // 4), "relu", hardsigmoid, name="se")(y, rules)
        y = Conv(self.out, 1, use_bias=True, name="project")(y)
        return y + x if self.stride == 1 and self.inp == self.out else y


class MobileNetV3(nn.Module):
    """torchvision ``MobileNetV3``: Hardswish stem, inverted residuals, 1x1 head, 2-layer classifier."""

    arch: str
    num_classes: int = 1000

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        settings = SETTINGS[self.arch]
        x = rules.hardswish(Conv(settings[0][0], 3, 2, 1, use_bias=True, name="features_0")(x))
        for i, cnf in enumerate(settings):
            x = InvertedResidual(*cnf, name=f"features_{i + 1}")(x, rules)
        x = rules.hardswish(Conv(6 * settings[-1][3], 1, use_bias=True, name=f"features_{len(settings) + 1}")(x))
        x = rules.hardswish(Dense(LAST_CHANNEL[self.arch], name="classifier_0")(global_avg_pool(x)))
        return Dense(self.num_classes, name="classifier_3")(x)


ARCHITECTURES = {arch: functools.partial(MobileNetV3, arch) for arch in SETTINGS}


def torch_layout(arch: str, sd) -> dict:
    """Map a torchvision MobileNetV3 state_dict onto this module's parameter tree."""
    settings = SETTINGS[arch]
    last = len(settings) + 1
    p = {
        "features_0": sd.conv_bn("features.0.0", "features.0.1", BN_EPS),
        f"features_{last}": sd.conv_bn(f"features.{last}.0", f"features.{last}.1", BN_EPS),
        "classifier_0": sd.dense("classifier.0"),
        "classifier_3": sd.dense("classifier.3"),
    }
    for i, (inp, _, expanded, _, use_se, _, _) in enumerate(settings):
        b = f"features.{i + 1}.block"
        names = (["expand"] if expanded != inp else []) + ["depthwise"] + (["se"] if use_se else []) + ["project"]
        block = {}
        for j, name in enumerate(names):
            if name == "se":
                block["se"] = {"fc1": sd.conv_bn(f"{b}.{j}.fc1", None), "fc2": sd.conv_bn(f"{b}.{j}.fc2", None)}
            else:
                block[name] = sd.conv_bn(f"{b}.{j}.0", f"{b}.{j}.1", BN_EPS)
        p[f"features_{i + 1}"] = block
    return p


CLASSIFIER = "classifier.3"  # the logits' layer in the state_dict: the number of classes is its weight's rows


FAMILY = Family(
    architectures=ARCHITECTURES,
    torch_layout=torch_layout,
    max_pools=False,
    classifier=CLASSIFIER,
    gradcam_layer=GradCamLayer("features.-1", before_batchnorm=True),  # the last convolution (features[-1][0])
)
