"""torchvision's GoogLeNet (Inception v1): googlenet.

Module and parameter names follow torchvision's (``inception3a/branch2_0/conv``; torchvision's
``nn.Sequential`` index ``branch2.0`` becomes ``branch2_0``), with each ``BasicConv2d``'s
BatchNorm (eps 0.001) folded into its convolution. The max-pools are torchvision's, in ceil mode
(an extra window at the lower/right border where floor mode would drop pixels). Every ReLU is
gated, although torchvision applies them functionally (``F.relu`` inside ``BasicConv2d``).

The auxiliary classifiers (``aux1``, ``aux2``) run only in training: the converter drops their
weights, whether the state_dict has them or not. torchvision's pretrained weights expect
``transform_input=True``: the ImageNet-normalised input re-normalised to ``(p - 0.5) / 0.5``
first, computed as torchvision computes it (``transform_input`` below).
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxpull.core.layers import IMAGENET_MEAN, IMAGENET_STD, Conv, Dense, Padding, global_avg_pool
from jaxpull.core.models.family import Family, GradCamLayer
from jaxpull.core.preprocessing import Preprocessing
from jaxpull.core.rules import Rules

# What torchvision's pretrained weights (GoogLeNet_Weights.IMAGENET1K_V1) expect.
PREPROCESSING = Preprocessing(crop_size=224, resize_size=256)
TRANSFORM_INPUT = True
# Training-only auxiliary classifiers, absent from the eval-mode network.
AUXILIARY_KEYS = r"^aux[12]\."
BN_EPS = 1e-3


def transform_input(x: jax.Array) -> jax.Array:
    """torchvision's ``_transform_input``: ImageNet-normalised ``(p - mean) / std`` -> ``(p - 0.5) / 0.5``.

    Computed per channel as ``x * (std / 0.5) + (mean - 0.5) / 0.5`` with the constants rounded
    from float64, as torch does. ``x``: ``(N, H, W, 3)``.
    """
    scale = np.asarray(IMAGENET_STD, np.float64) / 0.5
    shift = (np.asarray(IMAGENET_MEAN, np.float64) - 0.5) / 0.5
    return x * jnp.asarray(scale, x.dtype) + jnp.asarray(shift, x.dtype)


class BasicConv2d(nn.Module):
    """Convolution without bias, BatchNorm (eps 0.001, folded in as the bias), ReLU."""

    features: int
    kernel_size: int | tuple
    stride: int = 1
    padding: Padding = 0

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        x = Conv(self.features, self.kernel_size, self.stride, self.padding, use_bias=True, name="conv")(x)
        return rules.relu(x)


class Inception(nn.Module):
    """Four branches concatenated: 1x1; 1x1 -> 3x3; 1x1 -> 3x3 (torchvision's "5x5"); pool -> 1x1."""

    ch1x1: int
    ch3x3red: int
    ch3x3: int
    ch5x5red: int
    ch5x5: int
    pool_proj: int

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        branch1 = BasicConv2d(self.ch1x1, 1, name="branch1")(x, rules)
        branch2 = BasicConv2d(self.ch3x3red, 1, name="branch2_0")(x, rules)
        branch2 = BasicConv2d(self.ch3x3, 3, padding=1, name="branch2_1")(branch2, rules)
        branch3 = BasicConv2d(self.ch5x5red, 1, name="branch3_0")(x, rules)
        # kernel 3 rather than 5: torchvision's known bug (pytorch/vision#906), kept for its weights
        branch3 = BasicConv2d(self.ch5x5, 3, padding=1, name="branch3_1")(branch3, rules)
        branch4 = rules.max_pool(x, 3, 1, 1, ceil_mode=True)
        branch4 = BasicConv2d(self.pool_proj, 1, name="branch4_1")(branch4, rules)
        return jnp.concatenate([branch1, branch2, branch3, branch4], axis=-1)


class GoogLeNet(nn.Module):
    """torchvision ``GoogLeNet`` in eval mode: stem, nine Inception blocks, global pool, ``fc``."""

    num_classes: int = 1000
    transform_input: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        if self.transform_input:
            x = transform_input(x)
        x = BasicConv2d(64, 7, 2, 3, name="conv1")(x, rules)
        x = rules.max_pool(x, 3, 2, 0, ceil_mode=True)  # maxpool1
        x = BasicConv2d(64, 1, name="conv2")(x, rules)
        x = BasicConv2d(192, 3, padding=1, name="conv3")(x, rules)
        x = rules.max_pool(x, 3, 2, 0, ceil_mode=True)  # maxpool2
        x = Inception(64, 96, 128, 16, 32, 32, name="inception3a")(x, rules)
        x = Inception(128, 128, 192, 32, 96, 64, name="inception3b")(x, rules)
        x = rules.max_pool(x, 3, 2, 0, ceil_mode=True)  # maxpool3
        x = Inception(192, 96, 208, 16, 48, 64, name="inception4a")(x, rules)
        x = Inception(160, 112, 224, 24, 64, 64, name="inception4b")(x, rules)
        x = Inception(128, 128, 256, 24, 64, 64, name="inception4c")(x, rules)
        x = Inception(112, 144, 288, 32, 64, 64, name="inception4d")(x, rules)
        x = Inception(256, 160, 320, 32, 128, 128, name="inception4e")(x, rules)
        x = rules.max_pool(x, 2, 2, 0, ceil_mode=True)  # maxpool4
        x = Inception(256, 160, 320, 32, 128, 128, name="inception5a")(x, rules)
        x = Inception(384, 192, 384, 48, 128, 128, name="inception5b")(x, rules)
        return Dense(self.num_classes, name="fc")(global_avg_pool(x))  # dropout: identity in eval


ARCHITECTURES = {"googlenet": GoogLeNet}


def basic_convs(sd) -> dict:
    """Every ``BasicConv2d`` of a state_dict (``P.conv.weight`` with BatchNorm ``P.bn``, folded),
    nested at its torchvision path ``P`` (an ``nn.Sequential`` index joins its parent: ``branch2_0``)."""
    tree: dict = {}
    for key in list(sd.tensors):
        if not key.endswith(".conv.weight"):
            continue
        prefix = key[: -len(".conv.weight")]
        node = tree
        for part in re.sub(r"\.(\d+)(?=\.|$)", r"_\1", prefix).split("."):
            node = node.setdefault(part, {})
        node["conv"] = sd.conv_bn(f"{prefix}.conv", f"{prefix}.bn", eps=BN_EPS)
    return tree


def torch_layout(arch: str, sd) -> dict:
    """Map a torchvision GoogLeNet state_dict onto the tree (the converter has dropped ``AUXILIARY_KEYS``)."""
    return {**basic_convs(sd), "fc": sd.dense("fc")}


CLASSIFIER = "fc"  # the logits' layer in the state_dict: the number of classes is its weight's rows


FAMILY = Family(
    architectures=ARCHITECTURES,
    torch_layout=torch_layout,
    max_pools=True,
    preprocessing=PREPROCESSING,
    transform_input=TRANSFORM_INPUT,
    auxiliary_keys=AUXILIARY_KEYS,
    classifier=CLASSIFIER,
    gradcam_layer=GradCamLayer("inception5b"),  # the last feature map
)
