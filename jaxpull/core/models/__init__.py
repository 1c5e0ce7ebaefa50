"""Architectures: a plain dict from torchvision name (timm's: ``timm/<model name>``) to a Flax module builder and its facts.

Each family lives in its own file, which ends with one explicit ``FAMILY = Family(...)``
declaration (:mod:`jaxpull.core.models.family`): its builders, how torchvision's state_dict maps
onto its parameter tree (``torch_layout``) and its facts. Nothing here imports torch.
"""

from __future__ import annotations

from jaxpull.core.models import (
    alexnet,
    convnext,
    densenet,
    efficientnet,
    efficientnet_lite,
    googlenet,
    inception,
    maxvit,
    mnasnet,
    mobilenet,
    mobilenet_v3,
    pvt_v2,
    regnet,
    resnet,
    shufflenet,
    squeezenet,
    swin,
    vgg,
    vit,
)
from jaxpull.core.models.family import Architecture, Family  # noqa: F401 (the family files' type)

ARCHITECTURES: dict[str, Architecture] = {
    **resnet.FAMILY.entries(),
    **vgg.FAMILY.entries(),
    **densenet.FAMILY.entries(),
    **alexnet.FAMILY.entries(),
    **mobilenet.FAMILY.entries(),
    **efficientnet_lite.FAMILY.entries(),
    **regnet.FAMILY.entries(),
    **mnasnet.FAMILY.entries(),
    **shufflenet.FAMILY.entries(),
    **googlenet.FAMILY.entries(),
    **inception.FAMILY.entries(),
    **mobilenet_v3.FAMILY.entries(),
    **squeezenet.FAMILY.entries(),
    **efficientnet.FAMILY.entries(),
    **convnext.FAMILY.entries(),
    **maxvit.FAMILY.entries(),
    **vit.FAMILY.entries(),
    **swin.FAMILY.entries(),
    # timm's architectures, named as on the Hugging Face hub: timm/<model name>
    **pvt_v2.FAMILY.entries(),
}


def get(arch: str) -> Architecture:
    """The family entry of ``arch``, or a ValueError listing the known names."""
    try:
        return ARCHITECTURES[arch]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}: choose one of {', '.join(sorted(ARCHITECTURES))}") from None
