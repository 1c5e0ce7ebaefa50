"""torchvision's SqueezeNet: squeezenet1_0 and squeezenet1_1.

Fire modules (1x1 squeeze, then concatenated 1x1 and 3x3 expands) between ceil-mode max-pools;
the classifier is a 1x1 convolution followed by a ReLU (gated, like every ReLU) and a global
average pool. ``features_N`` are torchvision's ``features.N``; ``classifier_1`` its final
convolution (dropout is the identity in eval mode).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpull.core.layers import Conv, global_avg_pool
from jaxpull.core.models.family import Family, GradCamLayer
from jaxpull.core.rules import Rules

# torchvision's ``features`` after the stem convolution, ReLU and first max-pool (indices 0-2):
# "M" a 3x3/2 ceil-mode max-pool, (squeeze, expand1x1, expand3x3) a Fire module.
FEATURES: dict[str, tuple[str | tuple[int, int, int], ...]] = {
    "1_0": (
        (16, 64, 64),
        (16, 64, 64),
        (32, 128, 128),
        "M",
        (32, 128, 128),
        (48, 192, 192),
        (48, 192, 192),
        (64, 256, 256),
        "M",
        (64, 256, 256),
    ),
    "1_1": (
        (16, 64, 64),
        (16, 64, 64),
        "M",
        (32, 128, 128),
        (32, 128, 128),
        "M",
        (48, 192, 192),
        (48, 192, 192),
        (64, 256, 256),
        (64, 256, 256),
    ),
}
# The stem convolution: (output channels, kernel), stride 2, no padding.
STEM = {"1_0": (96, 7), "1_1": (64, 3)}


class Fire(nn.Module):
    """1x1 squeeze + ReLU, then ``concat(relu(1x1 expand), relu(3x3 expand))`` on channels."""

    squeeze: int
    expand1x1: int
    expand3x3: int

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        x = rules.relu(Conv(self.squeeze, 1, use_bias=True, name="squeeze")(x))
        return jnp.concatenate(
            [
                rules.relu(Conv(self.expand1x1, 1, use_bias=True, name="expand1x1")(x)),
                rules.relu(Conv(self.expand3x3, 3, 1, 1, use_bias=True, name="expand3x3")(x)),
            ],
            axis=-1,
        )


def feature_indices(features: Sequence[str | tuple[int, int, int]]):
    """Yield ``(torchvision index, entry)`` for the entries of ``features`` after the stem."""
    for offset, v in enumerate(features):
        yield 3 + offset, v


class SqueezeNet(nn.Module):
    """torchvision ``SqueezeNet``: stem conv + ReLU + pool, Fire modules and pools, conv classifier."""

    version: str
    num_classes: int = 1000

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        channels, kernel = STEM[self.version]
        x = rules.relu(Conv(channels, kernel, 2, 0, use_bias=True, name="features_0")(x))
        x = rules.max_pool(x, 3, 2, 0, ceil_mode=True)
        for index, v in feature_indices(FEATURES[self.version]):
            if v == "M":
                x = rules.max_pool(x, 3, 2, 0, ceil_mode=True)
            else:
                x = Fire(*v, name=f"features_{index}")(x, rules)
        x = rules.relu(Conv(self.num_classes, 1, use_bias=True, name="classifier_1")(x))
        return global_avg_pool(x)


ARCHITECTURES = {f"squeezenet{v}": functools.partial(SqueezeNet, v) for v in FEATURES}


def torch_layout(arch: str, sd) -> dict:
    """Map a torchvision SqueezeNet state_dict onto this module's parameter tree."""
    version = arch[len("squeezenet") :]
    p = {"features_0": sd.conv_bn("features.0", None), "classifier_1": sd.conv_bn("classifier.1", None)}
    for index, v in feature_indices(FEATURES[version]):
        if v != "M":
            p[f"features_{index}"] = {
                name: sd.conv_bn(f"features.{index}.{name}", None) for name in ("squeeze", "expand1x1", "expand3x3")
            }
    return p


CLASSIFIER = "classifier.1"  # the logits' layer (a 1x1 convolution): the number of classes is its weight's rows


FAMILY = Family(
    architectures=ARCHITECTURES,
    torch_layout=torch_layout,
    max_pools=True,
    classifier=CLASSIFIER,
    gradcam_layer=GradCamLayer("features.-1"),  # the last Fire module
)
