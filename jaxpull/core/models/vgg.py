"""torchvision's VGG family: vgg11/13/16/19 and their ``_bn`` versions.

``features/N`` are torchvision's ``features.N`` convolutions (with the BatchNorm at
``features.N+1`` folded in for the ``_bn`` versions); ``classifier/0``, ``/3``, ``/6`` its
linear layers. Dropout is the identity in eval mode.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax

from jaxpull.core.layers import Conv, Dense, adaptive_avg_pool, flatten_chw
from jaxpull.core.models.family import Family, GradCamLayer
from jaxpull.core.rules import Rules

CONFIGS = {
    "A": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "B": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "D": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "E": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}


def feature_indices(config: Sequence[int | str], batch_norm: bool):
    """Yield ``(torchvision index, entry)`` for each entry of ``features``."""
    index = 0
    for v in config:
        yield index, v
        index += 1 if v == "M" else (3 if batch_norm else 2)


class AvgPool(nn.Module):
    """torchvision's ``avgpool`` (adaptive average pooling to 7x7), a named module so that a layer
    reader (GradCAM, ``flax.linen.intercept_methods``) can find it; it has no parameters."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return adaptive_avg_pool(x, (7, 7))


class VGG(nn.Module):
    """torchvision ``VGG``: conv/ReLU stacks with 2x2 max-pools, 7x7 adaptive pool, 3 linears."""

    config: Sequence[int | str]
    batch_norm: bool = False
    num_classes: int = 1000

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        for index, v in feature_indices(self.config, self.batch_norm):
            if v == "M":
                x = rules.max_pool(x, 2, 2, 0)
            else:
                x = rules.relu(Conv(v, 3, 1, 1, use_bias=True, name=f"features_{index}")(x))
        x = flatten_chw(AvgPool(name="avgpool")(x))
        x = rules.relu(Dense(4096, name="classifier_0")(x))
        x = rules.relu(Dense(4096, name="classifier_3")(x))
        return Dense(self.num_classes, name="classifier_6")(x)


ARCHITECTURES = {
    f"vgg{depth}{suffix}": functools.partial(VGG, CONFIGS[cfg], batch_norm=bool(suffix))
    for depth, cfg in ((11, "A"), (13, "B"), (16, "D"), (19, "E"))
    for suffix in ("", "_bn")
}


def torch_layout(arch: str, sd) -> dict:
    """Map a torchvision VGG state_dict onto this module's parameter tree."""
    batch_norm = arch.endswith("_bn")
    config = CONFIGS[{"11": "A", "13": "B", "16": "D", "19": "E"}[arch[3:5]]]
    p = {}
    for index, v in feature_indices(config, batch_norm):
        if v != "M":
            bn = f"features.{index + 1}" if batch_norm else None
            p[f"features_{index}"] = sd.conv_bn(f"features.{index}", bn)
    for i in (0, 3, 6):
        p[f"classifier_{i}"] = sd.dense(f"classifier.{i}")
    return p


CLASSIFIER = "classifier.6"  # the logits' layer in the state_dict: the number of classes is its weight's rows


FAMILY = Family(
    architectures=ARCHITECTURES,
    torch_layout=torch_layout,
    max_pools=True,
    classifier=CLASSIFIER,
    gradcam_layer=GradCamLayer("avgpool"),  # the paper's layer
)
