"""torchvision's MNASNet (B1 variant, version 2): mnasnet0_5, mnasnet0_75, mnasnet1_0, mnasnet1_3.

A ReLU network of inverted residuals (1x1 expand + ReLU -> depthwise kxk + ReLU -> linear 1x1,
plus a skip where shapes allow). Channel depths scale with ``alpha`` through torchvision's
``_round_to_multiple_of``. BatchNorm uses torch's default eps 1e-5 (torchvision only changes
its momentum, which eval mode ignores) and is folded into each convolution. Top-level names
are torchvision's ``layers`` indices (``layers_0``, ``layers_8/0``, ``layers_14``).

A state_dict records the version of the module that saved it (torch's ``_metadata[""]``).
Version 1 (torchvision's published mnasnet0_5 and mnasnet1_0 weights) has a stem of fixed
width, 32 then 16 channels, where version 2 scales it with ``alpha``; torchvision rewrites the
stem when it loads a version-1 state_dict (``MNASNet._load_from_state_dict``), and so does
jaxpull: ``state_dict_config`` reads the version (from the stem's width where a file has no
``_metadata``: a ``.safetensors`` file), and ``ModelSpec.config`` records ``{"version": 1}``. For
alpha 1.0 both versions are the same network.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Literal

import flax.linen as nn
import jax
import numpy as np

from jaxpull.core.layers import Conv, Dense, global_avg_pool
from jaxpull.core.models.family import Family, GradCamLayer
from jaxpull.core.rules import Rules

# (kernel, first stride, expansion, repeats) of the six stacks, torchvision's ``layers[8:14]``
STACKS = ((3, 2, 3, 3), (5, 2, 3, 3), (5, 2, 6, 3), (3, 1, 6, 2), (5, 2, 6, 4), (3, 1, 6, 1))
DEPTHS = (32, 16, 24, 40, 80, 96, 192, 320)
V1_STEM = (32, 16)  # version 1's stem widths, whatever alpha


def _round_to_multiple_of(val: float, divisor: int, round_up_bias: float = 0.9) -> int:
    """torchvision's asymmetric rounding to a multiple of ``divisor``: (83, 8) -> 80, (84, 8) -> 88."""
    new_val = max(divisor, int(val + divisor / 2) // divisor * divisor)
    return new_val if new_val >= round_up_bias * val else new_val + divisor


def get_depths(alpha: float) -> tuple[int, ...]:
    """The eight channel depths of ``alpha``'s network (torchvision's ``_get_depths``)."""
    return tuple(_round_to_multiple_of(d * alpha, 8) for d in DEPTHS)


class InvertedResidual(nn.Module):
    """``pointwise`` 1x1 + ReLU -> ``depthwise`` kxk + ReLU -> ``linear`` 1x1 (+ input if same shape)."""

    out_ch: int
    kernel_size: int
    stride: int
    expansion_factor: int

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        mid = x.shape[-1] * self.expansion_factor
        y = rules.relu(Conv(mid, 1, use_bias=True, name="pointwise")(x))
        y = Conv(
            mid, self.kernel_size, self.stride, self.kernel_size // 2, groups=mid, use_bias=True, name="depthwise"
        )(y)
        y = Conv(self.out_ch, 1, use_bias=True, name="linear")(rules.relu(y))
        return y + x if x.shape[-1] == self.out_ch and self.stride == 1 else y


class Stack(nn.Module):
    """torchvision's ``_stack``: ``repeats`` inverted residuals named ``0``, ``1``, ...; the first strides."""

    out_ch: int
    kernel_size: int
    stride: int
    expansion_factor: int
    repeats: int

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        for i in range(self.repeats):
            x = InvertedResidual(
                self.out_ch, self.kernel_size, self.stride if i == 0 else 1, self.expansion_factor, name=str(i)
            )(x, rules)
        return x


class MNASNet(nn.Module):
    """torchvision ``MNASNet``: stem, depthwise-separable conv, six stacks, 1x1 to 1280, linear
    (the stem of ``version`` 1 or 2 of torchvision's module; the stacks take the stem's width)."""

    alpha: float
    num_classes: int = 1000
    version: int = 2  # of the state_dict: 1 has the fixed-width stem V1_STEM

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        depths = get_depths(self.alpha)
        stem = V1_STEM if self.version == 1 else depths[:2]
        x = rules.relu(Conv(stem[0], 3, 2, 1, use_bias=True, name="layers_0")(x))
        x = rules.relu(Conv(stem[0], 3, 1, 1, groups=stem[0], use_bias=True, name="layers_3")(x))
        x = Conv(stem[1], 1, use_bias=True, name="layers_6")(x)
        for i, (kernel, stride, expansion, repeats) in enumerate(STACKS):
            x = Stack(depths[i + 2], kernel, stride, expansion, repeats, name=f"layers_{8 + i}")(x, rules)
        x = rules.relu(Conv(1280, 1, use_bias=True, name="layers_14")(x))
        return Dense(self.num_classes, name="classifier_1")(global_avg_pool(x))


ARCHITECTURES = {
    "mnasnet0_5": functools.partial(MNASNet, 0.5),
    "mnasnet0_75": functools.partial(MNASNet, 0.75),
    "mnasnet1_0": functools.partial(MNASNet, 1.0),
    "mnasnet1_3": functools.partial(MNASNet, 1.3),
}


def state_dict_config(arch: str, tensors: Mapping[str, np.ndarray], metadata: Mapping | None = None) -> dict:
    """``{"version": 1}`` for a version-1 state_dict, ``{}`` for version 2: the version torch's
    ``_metadata`` records for the model, or where there is none, the one the stem's width
    (``layers.0.weight``) shows.

    Raises:
      ValueError: the metadata records a version other than 1 or 2.
    """
    version = dict((metadata or {}).get("", {})).get("version")
    if version is None:
        stem = tensors.get("layers.0.weight")
        alpha = ARCHITECTURES[arch].args[0]
        version = 1 if stem is not None and np.shape(stem)[0] == V1_STEM[0] != get_depths(alpha)[0] else 2
    if isinstance(version, bool) or version not in (1, 2):
        raise ValueError(f"the state_dict records MNASNet version {version!r}; torchvision's MNASNet has 1 and 2")
    return {"version": 1} if version == 1 else {}


def torch_layout(arch: str, sd, version: int = 2) -> dict:
    """Map a torchvision MNASNet state_dict onto this module's parameter tree (any ``version``: the
    keys are the same, only the stem's widths differ)."""
    p = {
        "layers_0": sd.conv_bn("layers.0", "layers.1"),
        "layers_3": sd.conv_bn("layers.3", "layers.4"),
        "layers_6": sd.conv_bn("layers.6", "layers.7"),
        "layers_14": sd.conv_bn("layers.14", "layers.15"),
        "classifier_1": sd.dense("classifier.1"),
    }
    for index in range(8, 8 + len(STACKS)):
        stack, i = {}, 0
        while sd.has(f"layers.{index}.{i}.layers.0.weight"):
            pre = f"layers.{index}.{i}.layers"
            stack[str(i)] = {
                "pointwise": sd.conv_bn(f"{pre}.0", f"{pre}.1"),
                "depthwise": sd.conv_bn(f"{pre}.3", f"{pre}.4"),
                "linear": sd.conv_bn(f"{pre}.6", f"{pre}.7"),
            }
            i += 1
        p[f"layers_{index}"] = stack
    return p


CONFIG_OPTIONS = {"version": Literal[1, 2]}  # ModelSpec.config: the state_dict's version (state_dict_config)
CLASSIFIER = "classifier.1"  # the logits' layer in the state_dict: the number of classes is its weight's rows


FAMILY = Family(
    architectures=ARCHITECTURES,
    torch_layout=torch_layout,
    max_pools=False,
    state_dict_config=state_dict_config,
    classifier=CLASSIFIER,
    config_options=CONFIG_OPTIONS,
    gradcam_layer=GradCamLayer("layers.14", before_batchnorm=True),  # the last convolution
)
