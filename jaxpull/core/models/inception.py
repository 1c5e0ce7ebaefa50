"""torchvision's Inception-v3: inception_v3.

Module and parameter names follow torchvision's (``Mixed_5b/branch5x5_2/conv``), with each
``BasicConv2d``'s BatchNorm (eps 0.001) folded into its convolution. Every pool is torchvision's:
floor-mode 3x3/2 max-pools (``maxpool1``, ``maxpool2`` and the functional ``F.max_pool2d`` of
InceptionB and InceptionD, all gated here), and ``F.avg_pool2d(x, 3, 1, 1)``, which counts the
zero padding (torch's ``count_include_pad=True``: every window divides by 9). Every ReLU is
gated, although torchvision applies them functionally.

The auxiliary classifier (``AuxLogits``) runs only in training: the converter drops its weights,
whether the state_dict has them or not. torchvision's pretrained weights expect
``transform_input=True`` and images resized to 342 and centre-cropped to 299. The smallest
input torchvision accepts is 75x75.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpull.core.layers import Dense, avg_pool, global_avg_pool
from jaxpull.core.models.family import Family, GradCamLayer
from jaxpull.core.models.googlenet import BasicConv2d, basic_convs, transform_input
from jaxpull.core.preprocessing import Preprocessing
from jaxpull.core.rules import Rules

# What torchvision's pretrained weights (Inception_V3_Weights.IMAGENET1K_V1) expect.
PREPROCESSING = Preprocessing(crop_size=299, resize_size=342)
TRANSFORM_INPUT = True
# The training-only auxiliary classifier, absent from the eval-mode network.
AUXILIARY_KEYS = r"^AuxLogits\."

ROW = ((0, 0), (3, 3))  # torch padding=(0, 3) of a 1x7 kernel
COLUMN = ((3, 3), (0, 0))  # torch padding=(3, 0) of a 7x1 kernel
ROW3 = ((0, 0), (1, 1))  # torch padding=(0, 1) of a 1x3 kernel
COLUMN3 = ((1, 1), (0, 0))  # torch padding=(1, 0) of a 3x1 kernel


def avg_pool_3x3(x: jax.Array) -> jax.Array:
    """``F.avg_pool2d(x, 3, stride=1, padding=1)``: zeros padded and counted (``(N, H, W, C)`` kept)."""
    return avg_pool(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), 3, 1)


class InceptionA(nn.Module):
    """1x1; 1x1 -> 5x5; 1x1 -> 3x3 -> 3x3; avg-pool -> 1x1 (``pool_features``)."""

    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        branch1x1 = BasicConv2d(64, 1, name="branch1x1")(x, rules)
        branch5x5 = BasicConv2d(48, 1, name="branch5x5_1")(x, rules)
        branch5x5 = BasicConv2d(64, 5, padding=2, name="branch5x5_2")(branch5x5, rules)
        branch3x3dbl = BasicConv2d(64, 1, name="branch3x3dbl_1")(x, rules)
        branch3x3dbl = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(branch3x3dbl, rules)
        branch3x3dbl = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_3")(branch3x3dbl, rules)
        branch_pool = BasicConv2d(self.pool_features, 1, name="branch_pool")(avg_pool_3x3(x), rules)
        return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
    """Grid reduction: 3x3/2; 1x1 -> 3x3 -> 3x3/2; max-pool 3x3/2."""

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        branch3x3 = BasicConv2d(384, 3, 2, name="branch3x3")(x, rules)
        branch3x3dbl = BasicConv2d(64, 1, name="branch3x3dbl_1")(x, rules)
        branch3x3dbl = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(branch3x3dbl, rules)
        branch3x3dbl = BasicConv2d(96, 3, 2, name="branch3x3dbl_3")(branch3x3dbl, rules)
        branch_pool = rules.max_pool(x, 3, 2, 0)
        return jnp.concatenate([branch3x3, branch3x3dbl, branch_pool], axis=-1)


class InceptionC(nn.Module):
    """Factorised 7x7: 1x1; 1x1 -> 1x7 -> 7x1; 1x1 -> 7x1 -> 1x7 -> 7x1 -> 1x7; avg-pool -> 1x1."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        c7 = self.channels_7x7
        branch1x1 = BasicConv2d(192, 1, name="branch1x1")(x, rules)
        branch7x7 = BasicConv2d(c7, 1, name="branch7x7_1")(x, rules)
        branch7x7 = BasicConv2d(c7, (1, 7), padding=ROW, name="branch7x7_2")(branch7x7, rules)
        branch7x7 = BasicConv2d(192, (7, 1), padding=COLUMN, name="branch7x7_3")(branch7x7, rules)
        branch7x7dbl = BasicConv2d(c7, 1, name="branch7x7dbl_1")(x, rules)
        branch7x7dbl = BasicConv2d(c7, (7, 1), padding=COLUMN, name="branch7x7dbl_2")(branch7x7dbl, rules)
        branch7x7dbl = BasicConv2d(c7, (1, 7), padding=ROW, name="branch7x7dbl_3")(branch7x7dbl, rules)
        branch7x7dbl = BasicConv2d(c7, (7, 1), padding=COLUMN, name="branch7x7dbl_4")(branch7x7dbl, rules)
        branch7x7dbl = BasicConv2d(192, (1, 7), padding=ROW, name="branch7x7dbl_5")(branch7x7dbl, rules)
        branch_pool = BasicConv2d(192, 1, name="branch_pool")(avg_pool_3x3(x), rules)
        return jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
    """Grid reduction: 1x1 -> 3x3/2; 1x1 -> 1x7 -> 7x1 -> 3x3/2; max-pool 3x3/2."""

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        branch3x3 = BasicConv2d(192, 1, name="branch3x3_1")(x, rules)
        branch3x3 = BasicConv2d(320, 3, 2, name="branch3x3_2")(branch3x3, rules)
        branch7x7x3 = BasicConv2d(192, 1, name="branch7x7x3_1")(x, rules)
        branch7x7x3 = BasicConv2d(192, (1, 7), padding=ROW, name="branch7x7x3_2")(branch7x7x3, rules)
        branch7x7x3 = BasicConv2d(192, (7, 1), padding=COLUMN, name="branch7x7x3_3")(branch7x7x3, rules)
        branch7x7x3 = BasicConv2d(192, 3, 2, name="branch7x7x3_4")(branch7x7x3, rules)
        branch_pool = rules.max_pool(x, 3, 2, 0)
        return jnp.concatenate([branch3x3, branch7x7x3, branch_pool], axis=-1)


class InceptionE(nn.Module):
    """Expanded filter bank: 1x1; 1x1 -> (1x3 | 3x1); 1x1 -> 3x3 -> (1x3 | 3x1); avg-pool -> 1x1."""

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        branch1x1 = BasicConv2d(320, 1, name="branch1x1")(x, rules)
        branch3x3 = BasicConv2d(384, 1, name="branch3x3_1")(x, rules)
        branch3x3 = jnp.concatenate(
            [
                BasicConv2d(384, (1, 3), padding=ROW3, name="branch3x3_2a")(branch3x3, rules),
                BasicConv2d(384, (3, 1), padding=COLUMN3, name="branch3x3_2b")(branch3x3, rules),
            ],
            axis=-1,
        )
        branch3x3dbl = BasicConv2d(448, 1, name="branch3x3dbl_1")(x, rules)
        branch3x3dbl = BasicConv2d(384, 3, padding=1, name="branch3x3dbl_2")(branch3x3dbl, rules)
        branch3x3dbl = jnp.concatenate(
            [
                BasicConv2d(384, (1, 3), padding=ROW3, name="branch3x3dbl_3a")(branch3x3dbl, rules),
                BasicConv2d(384, (3, 1), padding=COLUMN3, name="branch3x3dbl_3b")(branch3x3dbl, rules),
            ],
            axis=-1,
        )
        branch_pool = BasicConv2d(192, 1, name="branch_pool")(avg_pool_3x3(x), rules)
        return jnp.concatenate([branch1x1, branch3x3, branch3x3dbl, branch_pool], axis=-1)


class Inception3(nn.Module):
    """torchvision ``Inception3`` in eval mode: stem, Mixed_5b..Mixed_7c, global pool, ``fc``."""

    num_classes: int = 1000
    transform_input: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        if self.transform_input:
            x = transform_input(x)
        x = BasicConv2d(32, 3, 2, name="Conv2d_1a_3x3")(x, rules)
        x = BasicConv2d(32, 3, name="Conv2d_2a_3x3")(x, rules)
        x = BasicConv2d(64, 3, padding=1, name="Conv2d_2b_3x3")(x, rules)
        x = rules.max_pool(x, 3, 2, 0)  # maxpool1
        x = BasicConv2d(80, 1, name="Conv2d_3b_1x1")(x, rules)
        x = BasicConv2d(192, 3, name="Conv2d_4a_3x3")(x, rules)
        x = rules.max_pool(x, 3, 2, 0)  # maxpool2
        x = InceptionA(32, name="Mixed_5b")(x, rules)
        x = InceptionA(64, name="Mixed_5c")(x, rules)
        x = InceptionA(64, name="Mixed_5d")(x, rules)
        x = InceptionB(name="Mixed_6a")(x, rules)
        x = InceptionC(128, name="Mixed_6b")(x, rules)
        x = InceptionC(160, name="Mixed_6c")(x, rules)
        x = InceptionC(160, name="Mixed_6d")(x, rules)
        x = InceptionC(192, name="Mixed_6e")(x, rules)
        x = InceptionD(name="Mixed_7a")(x, rules)
        x = InceptionE(name="Mixed_7b")(x, rules)
        x = InceptionE(name="Mixed_7c")(x, rules)
        return Dense(self.num_classes, name="fc")(global_avg_pool(x))  # dropout: identity in eval


ARCHITECTURES = {"inception_v3": Inception3}


def torch_layout(arch: str, sd) -> dict:
    """Map a torchvision Inception-v3 state_dict onto the tree (the converter has dropped ``AUXILIARY_KEYS``)."""
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
    gradcam_layer=GradCamLayer("Mixed_7c"),  # the last feature map
)
