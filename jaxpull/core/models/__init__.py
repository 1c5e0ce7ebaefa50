"""Architectures: a plain dict from torchvision name to a Flax module builder.

Each family lives in its own file, which also says how torchvision's state_dict maps onto its
parameter tree (``torch_layout``). Nothing here imports torch.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Tuple

import flax.linen as nn

from jaxpull.core.layers import IMAGENET_MEAN, IMAGENET_STD
from jaxpull.core.models import (
    alexnet,
    convnext,
    densenet,
    efficientnet,
    efficientnet_lite,
    googlenet,
    inception,
    maxvit,
)
from jaxpull.core.models import mnasnet, mobilenet, mobilenet_v3, regnet, resnet, shufflenet, squeezenet, swin, vgg, vit
from jaxpull.core.models import options
from jaxpull.core.preprocessing import Preprocessing


class Family(NamedTuple):
    """What the converter needs to know about an architecture."""

    build: Callable[..., nn.Module]  # builder(num_classes=..., **config) -> module(x, gating) -> logits
    torch_layout: Callable  # (arch, StateDict reader, **config) -> parameter tree
    max_pools: bool  # MAX_POOLS: whether the network has max-pools (a pool temperature applies)
    # CLASSIFIER: the torch state_dict prefix of the layer whose outputs are the logits (``fc``,
    # ``heads.head``): the number of classes is its weight's first dimension, read by name
    classifier: str
    # The family file's optional facts (module constants of the same names):
    preprocessing: Preprocessing = Preprocessing()  # PREPROCESSING (or a dict by arch): resize/crop its weights expect
    transform_input: Optional[bool] = None  # TRANSFORM_INPUT: torchvision's for those weights; None: no such option
    auxiliary_keys: Optional[str] = None  # AUXILIARY_KEYS: regex of training-only state_dict keys, dropped
    # torch_config(torch module) -> {builder option: value}: the sizes of a torch model built with
    # other options than the named architecture's (tests use small ones); None: no size options.
    torch_config: Optional[Callable] = None
    # state_dict_config(arch, tensors, metadata) -> {builder option: value}: the options a state_dict
    # fixes beyond the named architecture's sizes (ViT's image size: vit_h_14's 518 px weights;
    # MNASNet's version, from torch's _metadata).
    state_dict_config: Optional[Callable] = None
    # INPUT_NORMALIZATION: (mean, std) in [0, 1] pixel units its weights were trained with
    input_mean: Tuple[float, float, float] = IMAGENET_MEAN
    input_std: Tuple[float, float, float] = IMAGENET_STD
    # LEGACY_KEYS: (regex, replacement) renaming old checkpoints' keys to torchvision's current ones
    legacy_keys: Optional[Tuple[str, str]] = None
    # CONFIG_OPTIONS: {builder option: type} a ModelSpec.config may set (see options.py); none by default
    config_options: Mapping[str, Any] = options.NO_OPTIONS

    def check_config(self, arch: str, config: Mapping[str, Any]) -> Tuple[Tuple[str, Any], ...]:
        """``config`` as sorted ``(option, value)`` pairs; ValueError naming an option this family's
        builder does not take or a value of the wrong type or range."""
        return options.check(arch, config, self.config_options)


def _by_arch(value, arch: str, default):
    """A family fact given once for the family, or as a dict by architecture."""
    return value.get(arch, default) if isinstance(value, dict) else value


def _family(module) -> Dict[str, Family]:
    """The entries of a family file, from its module constants (see :class:`Family`)."""
    fact = lambda name, default=None: getattr(module, name, default)
    entries = {}
    for name, build in module.ARCHITECTURES.items():
        mean, std = _by_arch(fact("INPUT_NORMALIZATION", {}), name, (IMAGENET_MEAN, IMAGENET_STD))
        entries[name] = Family(
            build=build,
            torch_layout=module.torch_layout,
            max_pools=module.MAX_POOLS,
            classifier=module.CLASSIFIER,
            preprocessing=_by_arch(fact("PREPROCESSING", Preprocessing()), name, Preprocessing()),
            transform_input=fact("TRANSFORM_INPUT"),
            auxiliary_keys=fact("AUXILIARY_KEYS"),
            torch_config=fact("torch_config"),
            state_dict_config=fact("state_dict_config"),
            input_mean=tuple(mean),
            input_std=tuple(std),
            legacy_keys=fact("LEGACY_KEYS"),
            config_options=fact("CONFIG_OPTIONS", options.NO_OPTIONS),
        )
    return entries


ARCHITECTURES: Dict[str, Family] = {
    **_family(resnet),
    **_family(vgg),
    **_family(densenet),
    **_family(alexnet),
    **_family(mobilenet),
    **_family(efficientnet_lite),
    **_family(regnet),
    **_family(mnasnet),
    **_family(shufflenet),
    **_family(googlenet),
    **_family(inception),
    **_family(mobilenet_v3),
    **_family(squeezenet),
    **_family(efficientnet),
    **_family(convnext),
    **_family(maxvit),
    **_family(vit),
    **_family(swin),
}


def get(arch: str) -> Family:
    """The family entry of ``arch``, or a ValueError listing the known names."""
    try:
        return ARCHITECTURES[arch]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}: choose one of {', '.join(sorted(ARCHITECTURES))}") from None
