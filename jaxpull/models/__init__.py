"""Architectures: a plain dict from torchvision name to a Flax module builder.

Each family lives in its own file, which also says how torchvision's state_dict maps onto its
parameter tree (``torch_layout``). Nothing here imports torch.
"""

from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional

import flax.linen as nn

from jaxpull.models import alexnet, densenet, efficientnet_lite, mobilenet, resnet, vgg
from jaxpull.models import mnasnet, regnet, shufflenet
from jaxpull.models import googlenet, inception
from jaxpull.models import mobilenet_v3, squeezenet
from jaxpull.models import efficientnet
from jaxpull.models import convnext
from jaxpull.models import maxvit
from jaxpull.models import vit
from jaxpull.models import swin
from jaxpull.preprocessing import Preprocessing


class Family(NamedTuple):
    """What the converter needs to know about an architecture."""

    build: Callable[..., nn.Module]  # builder(num_classes=...) -> module(x, gating) -> logits
    torch_layout: Callable  # (arch, StateDict reader) -> parameter tree
    max_pools: bool  # whether the network has max-pools (a pool temperature applies)
    # The family file's optional facts (module constants of the same names):
    preprocessing: Preprocessing = Preprocessing()  # PREPROCESSING (or a dict by arch): resize/crop its weights expect
    transform_input: Optional[bool] = None  # TRANSFORM_INPUT: torchvision's for those weights; None: no such option
    auxiliary_keys: Optional[str] = None  # AUXILIARY_KEYS: regex of training-only state_dict keys, dropped
    # torch_config(torch module) -> {builder option: value}: the sizes of a torch model built with
    # other options than the named architecture's (tests use small ones); None: no size options.
    torch_config: Optional[Callable] = None


def _family(module, max_pools: bool) -> Dict[str, Family]:
    """The entries of a family file; its ``PREPROCESSING`` is one for all, or a dict by architecture."""
    pre = getattr(module, "PREPROCESSING", Preprocessing())
    facts = (getattr(module, "TRANSFORM_INPUT", None), getattr(module, "AUXILIARY_KEYS", None),
             getattr(module, "torch_config", None))
    return {name: Family(build, module.torch_layout, max_pools, pre.get(name, Preprocessing()) if isinstance(pre, dict)
                         else pre, *facts) for name, build in module.ARCHITECTURES.items()}


ARCHITECTURES: Dict[str, Family] = {
    **_family(resnet, max_pools=True),
    **_family(vgg, max_pools=True),
    **_family(densenet, max_pools=True),
    **_family(alexnet, max_pools=True),
    **_family(mobilenet, max_pools=False),
    **_family(efficientnet_lite, max_pools=False),
    **_family(regnet, max_pools=False),
    **_family(mnasnet, max_pools=False),
    **_family(shufflenet, max_pools=True),
    **_family(googlenet, max_pools=True),
    **_family(inception, max_pools=True),
    **_family(mobilenet_v3, max_pools=False),
    **_family(squeezenet, max_pools=True),
    **_family(efficientnet, max_pools=False),
    **_family(convnext, max_pools=False),
    **_family(maxvit, max_pools=False),
    **_family(vit, max_pools=False),
    **_family(swin, max_pools=False),
}


def get(arch: str) -> Family:
    """The family entry of ``arch``, or a ValueError listing the known names."""
    try:
        return ARCHITECTURES[arch]
    except KeyError:
        raise ValueError(
            f"unknown architecture {arch!r}: choose one of {', '.join(sorted(ARCHITECTURES))}"
        ) from None
