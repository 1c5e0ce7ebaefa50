"""torchvision's DenseNet family: densenet121/161/169/201.

DenseNet is pre-activation (BatchNorm -> ReLU -> conv), so only ``norm0`` folds into
``conv0``; every other BatchNorm is kept as an ``Affine`` layer.

Every ReLU is gated, including the functional ``F.relu`` torchvision applies after
``features``: the PyTorch reference implementation swaps ``nn.ReLU`` modules only and so leaves
that last gate hard. jaxpull follows the theory (every gate soft); see the README.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpull.core.layers import Affine, Conv, Dense, avg_pool, global_avg_pool
from jaxpull.core.models.family import Family, GradCamLayer
from jaxpull.core.rules import Rules


class DenseLayer(nn.Module):
    """norm1 -> relu -> 1x1 conv1 -> norm2 -> relu -> 3x3 conv2; returns the new features only."""

    growth_rate: int
    bn_size: int

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        y = rules.relu(Affine(name="norm1")(x))
        y = Conv(self.bn_size * self.growth_rate, 1, name="conv1")(y)
        y = rules.relu(Affine(name="norm2")(y))
        return Conv(self.growth_rate, 3, 1, 1, name="conv2")(y)


class DenseBlock(nn.Module):
    """``denselayer1..n``, each reading the concatenation of everything before it."""

    num_layers: int
    growth_rate: int
    bn_size: int

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        features = [x]
        for i in range(self.num_layers):
            new = DenseLayer(self.growth_rate, self.bn_size, name=f"denselayer{i + 1}")(
                jnp.concatenate(features, axis=-1), rules
            )
            features.append(new)
        return jnp.concatenate(features, axis=-1)


class Transition(nn.Module):
    """norm -> relu -> 1x1 conv halving the channels -> 2x2 average pool."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        x = rules.relu(Affine(name="norm")(x))
        return avg_pool(Conv(self.features, 1, name="conv")(x), 2, 2)


class DenseNet(nn.Module):
    """torchvision ``DenseNet``: stem, dense blocks with transitions, norm5, ReLU, pool, linear."""

    growth_rate: int
    block_config: Sequence[int]
    num_init_features: int
    bn_size: int = 4
    num_classes: int = 1000

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        x = rules.relu(Conv(self.num_init_features, 7, 2, 3, use_bias=True, name="conv0")(x))
        x = rules.max_pool(x, 3, 2, 1)
        num_features = self.num_init_features
        for i, num_layers in enumerate(self.block_config):
            x = DenseBlock(num_layers, self.growth_rate, self.bn_size, name=f"denseblock{i + 1}")(x, rules)
            num_features += num_layers * self.growth_rate
            if i != len(self.block_config) - 1:
                num_features //= 2
                x = Transition(num_features, name=f"transition{i + 1}")(x, rules)
        x = rules.relu(Affine(name="norm5")(x))  # torchvision's functional ReLU, gated here
        return Dense(self.num_classes, name="classifier")(global_avg_pool(x))


ARCHITECTURES = {
    "densenet121": functools.partial(DenseNet, 32, (6, 12, 24, 16), 64),
    "densenet161": functools.partial(DenseNet, 48, (6, 12, 36, 24), 96),
    "densenet169": functools.partial(DenseNet, 32, (6, 12, 32, 32), 64),
    "densenet201": functools.partial(DenseNet, 32, (6, 12, 48, 32), 64),
}

# torchvision's published DenseNet checkpoints spell ``denselayerN.norm1`` as ``norm.1``.
LEGACY_KEY = (
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def torch_layout(arch: str, sd) -> dict:
    """Map a torchvision DenseNet state_dict (either key spelling) onto the parameter tree."""
    sd.rename(*LEGACY_KEYS)
    f = "features"
    p = {
        "conv0": sd.conv_bn(f"{f}.conv0", f"{f}.norm0"),
        "norm5": sd.affine(f"{f}.norm5"),
        "classifier": sd.dense("classifier"),
    }
    b = 1
    while sd.has(f"{f}.denseblock{b}.denselayer1.conv1.weight"):
        block, i = {}, 1
        while sd.has(f"{f}.denseblock{b}.denselayer{i}.conv1.weight"):
            pre = f"{f}.denseblock{b}.denselayer{i}"
            block[f"denselayer{i}"] = {
                "norm1": sd.affine(f"{pre}.norm1"),
                "conv1": sd.conv_bn(f"{pre}.conv1", None),
                "norm2": sd.affine(f"{pre}.norm2"),
                "conv2": sd.conv_bn(f"{pre}.conv2", None),
            }
            i += 1
        p[f"denseblock{b}"] = block
        if sd.has(f"{f}.transition{b}.conv.weight"):
            p[f"transition{b}"] = {
                "norm": sd.affine(f"{f}.transition{b}.norm"),
                "conv": sd.conv_bn(f"{f}.transition{b}.conv", None),
            }
        b += 1
    return p


CLASSIFIER = "classifier"  # the logits' layer in the state_dict: the number of classes is its weight's rows
LEGACY_KEYS = (LEGACY_KEY, r"\1\2")  # the published checkpoints' norm.1 / conv.1 -> the modules' norm1 / conv1


FAMILY = Family(
    architectures=ARCHITECTURES,
    torch_layout=torch_layout,
    max_pools=True,
    classifier=CLASSIFIER,
    legacy_keys=LEGACY_KEYS,
    gradcam_layer=GradCamLayer("norm5"),  # features.norm5: the last feature map
)
