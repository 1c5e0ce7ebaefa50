"""What a family file declares about its architectures: one explicit :class:`Family` value.

Each file of ``jaxpull/core/models/`` ends with ``FAMILY = Family(...)``: its builders by
torchvision name, how a torchvision state_dict maps onto its parameters, and its facts (typed
fields: a misspelt keyword is a ``TypeError`` when the module is imported, a value of the wrong
kind a ``TypeError`` naming the field). :func:`jaxpull.core.models.get` returns one
:class:`Architecture` per name, the family's facts resolved for it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn

from jaxpull.core.layers import IMAGENET_MEAN, IMAGENET_STD
from jaxpull.core.models import options
from jaxpull.core.preprocessing import Preprocessing

Normalization = tuple[tuple[float, float, float], tuple[float, float, float]]  # (mean, std) in [0, 1] pixels


class GradCamLayer(NamedTuple):
    """The layer a GradCAM-style explainer reads (``jaxpull.evaluation.cam``): the output of the module
    at ``path``, a module path of jaxpull's parameter tree written torchvision-style (``"layer4.-1.conv3"``:
    dots, or slashes, between names; a negative index counts from the last numbered child).

    ``before_batchnorm``: the module is a convolution with a BatchNorm folded in (jaxpull folds every
    eval-mode BatchNorm into the convolution before it), and the layer meant is torch's convolution
    *before* that BatchNorm (the paper's ResNet layer ``layer4[-1].conv3``). GradCAM of it is GradCAM of
    the folded output minus its bias: the BatchNorm's scale multiplies the activations and divides the
    gradients, so it cancels, and torchvision's convolutions before a BatchNorm have no bias of their own.
    """

    path: str
    before_batchnorm: bool = False


class Architecture(NamedTuple):
    """One named architecture: its builder and its family's facts, resolved for it."""

    build: Callable[..., nn.Module]  # builder(num_classes=..., **config) -> module(x, rules) -> logits
    torch_layout: Callable  # (arch, StateDict reader, **config) -> parameter tree
    max_pools: bool  # whether the network has max-pools (a pool temperature applies)
    # the torch state_dict prefix of the layer whose outputs are the logits (``fc``, ``heads.head``):
    # the number of classes is its weight's first dimension, read by name
    classifier: str
    preprocessing: Preprocessing  # the resize / crop its weights expect
    transform_input: bool | None  # torchvision's option for those weights; None: no such option
    auxiliary_keys: str | None  # regex of training-only state_dict keys, dropped
    torch_config: Callable | None  # (torch module) -> {builder option: value} of other sizes
    state_dict_config: Callable | None  # (arch, tensors) -> {builder option: value} a state_dict fixes
    input_mean: tuple[float, float, float]
    input_std: tuple[float, float, float]
    legacy_keys: tuple[str, str] | None  # (regex, replacement) renaming old checkpoints' keys
    config_options: Mapping[str, Any]  # {builder option: type} a ModelSpec.config may set (options.py)
    gradcam_layer: GradCamLayer | None = None  # GradCAM's default layer; None: the family has none

    def check_config(self, arch: str, config: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
        """``config`` as sorted ``(option, value)`` pairs; ValueError naming an option this family's
        builder does not take or a value of the wrong type or range."""
        return options.check(arch, config, self.config_options)


@dataclasses.dataclass(frozen=True)
class Family:
    """A family file's declaration (see the module docstring). Facts given once for the family, or
    as a dict by architecture name (``classifier``: one per architecture; ``preprocessing``,
    ``input_normalization``: the default for those not named): a file may hold torchvision's and
    timm's layouts of one computation."""

    architectures: Mapping[str, Callable[..., nn.Module]]
    torch_layout: Callable
    max_pools: bool
    classifier: str | Mapping[str, str]
    preprocessing: Preprocessing | Mapping[str, Preprocessing] = Preprocessing()
    transform_input: bool | None = None
    auxiliary_keys: str | None = None
    torch_config: Callable | None = None
    state_dict_config: Callable | None = None
    input_normalization: Normalization | Mapping[str, Normalization] = (IMAGENET_MEAN, IMAGENET_STD)
    legacy_keys: tuple[str, str] | None = None
    config_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    gradcam_layer: None | GradCamLayer | Mapping[str, GradCamLayer] = None

    def __post_init__(self):
        def need(ok: bool, name: str, what: str):
            if not ok:
                raise TypeError(f"Family.{name} must be {what}, got {getattr(self, name)!r}")

        need(
            isinstance(self.architectures, Mapping) and len(self.architectures) > 0,
            "architectures",
            "a non-empty dict of name -> builder",
        )
        need(callable(self.torch_layout), "torch_layout", "a function")
        need(isinstance(self.max_pools, bool), "max_pools", "True or False")
        need(isinstance(self.config_options, Mapping), "config_options", "a dict of option name -> type")
        by_arch = lambda v, kind: (
            isinstance(v, kind)
            or (isinstance(v, Mapping) and all(isinstance(x, kind) and k in self.architectures for k, x in v.items()))
        )
        need(
            by_arch(self.classifier, str) and (not isinstance(self.classifier, str) or len(self.classifier) > 0),
            "classifier",
            "a state_dict key prefix or a dict of them by arch",
        )
        need(
            isinstance(self.classifier, str) or set(self.classifier) == set(self.architectures),
            "classifier",
            "one key prefix for every architecture",
        )
        need(by_arch(self.preprocessing, Preprocessing), "preprocessing", "a Preprocessing or a dict of them by arch")
        need(self.transform_input in (None, True, False), "transform_input", "None, True or False")
        need(self.auxiliary_keys is None or isinstance(self.auxiliary_keys, str), "auxiliary_keys", "a regex or None")
        for name in ("torch_config", "state_dict_config"):
            need(getattr(self, name) is None or callable(getattr(self, name)), name, "a function or None")
        need(by_arch(self.input_normalization, tuple), "input_normalization", "(mean, std) or a dict of them by arch")
        need(
            self.legacy_keys is None or (isinstance(self.legacy_keys, tuple) and len(self.legacy_keys) == 2),
            "legacy_keys",
            "(regex, replacement) or None",
        )
        need(
            self.gradcam_layer is None or by_arch(self.gradcam_layer, GradCamLayer),
            "gradcam_layer",
            "a GradCamLayer, a dict of them by arch, or None",
        )

    def entries(self) -> dict[str, Architecture]:
        """One :class:`Architecture` per name."""

        def of(value, arch: str, default):
            return value.get(arch, default) if isinstance(value, Mapping) else value

        out = {}
        for arch, build in self.architectures.items():
            mean, std = of(self.input_normalization, arch, (IMAGENET_MEAN, IMAGENET_STD))
            out[arch] = Architecture(
                build,
                self.torch_layout,
                self.max_pools,
                of(self.classifier, arch, ""),
                of(self.preprocessing, arch, Preprocessing()),
                self.transform_input,
                self.auxiliary_keys,
                self.torch_config,
                self.state_dict_config,
                tuple(mean),
                tuple(std),
                self.legacy_keys,
                self.config_options,
                of(self.gradcam_layer, arch, None),
            )
        return out
