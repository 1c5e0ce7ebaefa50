"""Architectures: a plain dict from torchvision name to a Flax module builder.

Each family lives in its own file, which also says how torchvision's state_dict maps onto its
parameter tree (``torch_layout``). Nothing here imports torch.
"""

from __future__ import annotations

from typing import Callable, Dict, NamedTuple

import flax.linen as nn

from jaxpull.models import alexnet, densenet, efficientnet_lite, mobilenet, resnet, vgg


class Family(NamedTuple):
    """What the converter needs to know about an architecture."""

    build: Callable[..., nn.Module]  # builder(num_classes=...) -> module(x, gating) -> logits
    torch_layout: Callable  # (arch, StateDict reader) -> parameter tree


def _family(module) -> Dict[str, Family]:
    return {name: Family(build, module.torch_layout) for name, build in module.ARCHITECTURES.items()}


ARCHITECTURES: Dict[str, Family] = {
    **_family(resnet),
    **_family(vgg),
    **_family(densenet),
    **_family(alexnet),
    **_family(mobilenet),
    **_family(efficientnet_lite),
}


def get(arch: str) -> Family:
    """The family entry of ``arch``, or a ValueError listing the known names."""
    try:
        return ARCHITECTURES[arch]
    except KeyError:
        raise ValueError(
            f"unknown architecture {arch!r}: choose one of {', '.join(sorted(ARCHITECTURES))}"
        ) from None
