"""torchvision's AlexNet (the one-GPU variant of "One weird trick")."""

from __future__ import annotations

import flax.linen as nn
import jax

from jaxpull.core.layers import Conv, Dense, adaptive_avg_pool, flatten_chw
from jaxpull.core.models.family import Family, GradCamLayer
from jaxpull.core.rules import Rules

# (torchvision index, features, kernel, stride, padding, followed by a max-pool)
FEATURES = (
    (0, 64, 11, 4, 2, True),
    (3, 192, 5, 1, 2, True),
    (6, 384, 3, 1, 1, False),
    (8, 256, 3, 1, 1, False),
    (10, 256, 3, 1, 1, True),
)


class AlexNet(nn.Module):
    """Five convolutions with ReLUs and 3x3/2 max-pools, 6x6 adaptive pool, three linears."""

    num_classes: int = 1000

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        for index, features, kernel, stride, padding, pool in FEATURES:
            x = rules.relu(Conv(features, kernel, stride, padding, use_bias=True, name=f"features_{index}")(x))
            if pool:
                x = rules.max_pool(x, 3, 2, 0)
        x = flatten_chw(adaptive_avg_pool(x, (6, 6)))
        x = rules.relu(Dense(4096, name="classifier_1")(x))
        x = rules.relu(Dense(4096, name="classifier_4")(x))
        return Dense(self.num_classes, name="classifier_6")(x)


ARCHITECTURES = {"alexnet": AlexNet}


def torch_layout(arch: str, sd) -> dict:
    """Map a torchvision AlexNet state_dict onto this module's parameter tree."""
    p = {f"features_{f[0]}": sd.conv_bn(f"features.{f[0]}", None) for f in FEATURES}
    for i in (1, 4, 6):
        p[f"classifier_{i}"] = sd.dense(f"classifier.{i}")
    return p


CLASSIFIER = "classifier.6"  # the logits' layer in the state_dict: the number of classes is its weight's rows


FAMILY = Family(
    architectures=ARCHITECTURES,
    torch_layout=torch_layout,
    max_pools=True,
    classifier=CLASSIFIER,
    gradcam_layer=GradCamLayer("features.10"),  # the last convolution
)
