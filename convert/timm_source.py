"""timm as a source of weights: architectures named ``timm/<model name>``, as on the Hugging Face hub.

A family file declares its timm architectures (``"timm/pvt_v2_b1"``) and how timm's state_dict maps
onto its parameters (``torch_layout``, optionally ``torch_config`` / ``state_dict_config``); this
module does the rest for every such name, generically, through timm itself:

* the weights: timm's pretrained weights (``timm.create_model(name, pretrained=True)``, a tag
  chosen by ``--weights``, default timm's) or a local state_dict file;
* the check that a state_dict is the named model's: its keys and shapes against timm's own model
  of that name (built on torch's meta device: no memory), the classifier's rows read as the number
  of classes; where they differ, what differs, and which timm model jaxpull converts it is;
* the preprocessing its weights expect, from timm's ``pretrained_cfg`` (``input_size``,
  ``crop_pct``, ``crop_mode``, ``interpolation``, ``mean``, ``std``), recorded in the file: the
  crop side is the input size, the resized short side ``floor(input_size / crop_pct)`` (0.9 at
  224: 248), as timm's eval transform (``crop_mode="center"``) resizes and centre-crops;
* the self-check: timm's model with the converted weights against the converted model, on random
  images, as for torchvision.

Needs torch and timm (the ``convert`` extra). A converted file needs neither.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import jaxpull
from jaxpull.core import models
from jaxpull.core.model import Model
from jaxpull.core.preprocessing import INTERPOLATIONS, Preprocessing
from jaxpull.files import outputs
from jaxpull_convert import converter, offline, sources
from jaxpull_convert.converter import ConversionError
from jaxpull_convert.state_dict import unwrap, unwrap_note

if TYPE_CHECKING:
    import torch

PREFIX = "timm/"
# timm's eval transform's crop fraction where a pretrained_cfg gives none (timm.data.DEFAULT_CROP_PCT)
DEFAULT_CROP_PCT = 0.875
# timm's pretrained_cfg fields the converter reads and records
CFG_FIELDS = ("tag", "input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std")


def is_timm(arch: str) -> bool:
    """Whether ``arch`` names a timm architecture (``timm/<model name>``)."""
    return isinstance(arch, str) and arch.startswith(PREFIX)


def names() -> tuple[str, ...]:
    """Every timm architecture jaxpull converts (``timm/<model name>``), sorted."""
    return tuple(sorted(a for a in models.ARCHITECTURES if is_timm(a)))


def timm_name(arch: str) -> str:
    """timm's model name of a registered ``timm/<model name>``; ConversionError naming the ones
    jaxpull converts otherwise."""
    if arch not in models.ARCHITECTURES:
        raise ConversionError(f"unknown timm architecture {arch!r}: jaxpull converts {', '.join(names())}")
    return arch[len(PREFIX) :]


def timm_or_error():
    """The timm module; ConversionError saying how to install it where it is not."""
    try:
        import timm
    except ImportError:
        raise ConversionError("converting timm models needs timm: pip install 'jaxpull[convert]'") from None
    return timm


def _cfg_dict(cfg) -> dict[str, Any]:
    """A timm ``PretrainedCfg`` (or the dict a model's ``pretrained_cfg`` is) as a dict."""
    return dict(cfg) if isinstance(cfg, Mapping) else dataclasses.asdict(cfg)


def default_cfg(arch: str) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` of ``arch``'s default weights (no download)."""
    timm = timm_or_error()
    cfg = timm.models.get_pretrained_cfg(timm_name(arch))
    if cfg is None:
        raise ConversionError(f"timm has no pretrained_cfg for {arch}: is timm older than jaxpull expects?")
    return _cfg_dict(cfg)


def preprocessing(arch: str, cfg: Mapping[str, Any]) -> tuple[Preprocessing, tuple[float, ...], tuple[float, ...]]:
    """``(Preprocessing, mean, std)`` of a timm ``pretrained_cfg``: the crop side is the input size,
    the short side resized to ``floor(size / crop_pct)``, centre crop, its interpolation; mean and
    std in [0, 1] pixel units.

    Raises:
      ConversionError: what jaxpull's image loader cannot do as timm does: a non-square input, a
        ``crop_mode`` other than ``"center"`` (``"squash"``, ``"border"``), another interpolation
        than bilinear or bicubic, a mean or std that is not three numbers.
    """
    _, h, w = (int(v) for v in cfg["input_size"])
    if h != w:
        raise ConversionError(f"{arch}'s weights expect {h}x{w} images: jaxpull's image loader makes square crops")
    mode = cfg.get("crop_mode") or "center"
    if mode != "center":
        raise ConversionError(
            f"{arch}'s pretrained_cfg preprocesses with crop_mode {mode!r}: jaxpull's image loader resizes the "
            "short side and centre-crops (timm's crop_mode 'center') only"
        )
    interpolation = cfg.get("interpolation") or "bilinear"
    if interpolation not in INTERPOLATIONS:
        raise ConversionError(
            f"{arch}'s pretrained_cfg resizes with {interpolation!r} interpolation: jaxpull's image loader has "
            f"{', '.join(INTERPOLATIONS)}"
        )
    mean, std = tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])
    if len(mean) != 3 or len(std) != 3:
        raise ConversionError(f"{arch}'s pretrained_cfg normalises {len(mean)} channels: jaxpull explains RGB images")
    crop_pct = float(cfg.get("crop_pct") or DEFAULT_CROP_PCT)
    return Preprocessing(h, math.floor(h / crop_pct), interpolation).check(), mean, std


def _first(name) -> str:
    """A pretrained_cfg's ``first_conv``: a name, or the first of several."""
    return name[0] if isinstance(name, (tuple, list)) else name


def expected_shapes(arch: str, num_classes: int, config: Mapping[str, Any] | None = None) -> dict[str, tuple]:
    """The state_dict shapes of timm's model ``arch`` with ``num_classes`` classes and builder
    options ``config``, built on torch's meta device (no memory)."""
    return dict(_expected_shapes(arch, num_classes, tuple(sorted(dict(config or {}).items()))))


@functools.lru_cache(maxsize=32)
def _expected_shapes(arch: str, num_classes: int, config: tuple) -> tuple[tuple[str, tuple], ...]:
    import torch

    timm = timm_or_error()
    with torch.device("meta"):
        module = timm.create_model(timm_name(arch), pretrained=False, num_classes=num_classes, **dict(config))
    return tuple((k, tuple(v.shape)) for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked"))


def _shape(a) -> tuple:
    return tuple(int(d) for d in np.shape(a))


def _differences(expected: Mapping[str, tuple], tensors: Mapping[str, np.ndarray]) -> tuple[list, list, list]:
    """(missing keys, unexpected keys, keys of other shapes) of ``tensors`` against ``expected``."""
    given = {k: _shape(v) for k, v in tensors.items() if not k.endswith("num_batches_tracked")}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shaped = [k for k in expected if k in given and given[k] != expected[k]]
    return missing, unexpected, shaped


def _classifiers(cfg: Mapping[str, Any]) -> tuple[str, ...]:
    """timm's ``pretrained_cfg["classifier"]``: one layer's name, or several (DeiT's two heads)."""
    c = cfg["classifier"]
    return tuple(c) if isinstance(c, (tuple, list)) else (c,)


def _num_classes(cfg: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> int | None:
    """Rows of the (first) classifier's weight, None without one."""
    w = tensors.get(f"{_classifiers(cfg)[0]}.weight")
    return None if w is None or np.ndim(w) < 2 else _shape(w)[0]


def identify(tensors: Mapping[str, np.ndarray], exclude: str = "") -> list[str]:
    """The timm architectures jaxpull converts whose state_dict ``tensors`` is (keys and shapes, any
    number of classes)."""
    found = []
    for other in names():
        if other == exclude:
            continue
        n = _num_classes(default_cfg(other), tensors)
        if n is not None and not any(_differences(expected_shapes(other, n), tensors)):
            found.append(other)
    return found


def check_state_dict(arch: str, tensors: Mapping[str, np.ndarray], cfg: Mapping[str, Any]) -> tuple[int, dict]:
    """``(num_classes, config)`` of a state_dict of timm's ``arch``, checked against timm's own model.

    ``config``: builder options the family reads off the state_dict (its ``state_dict_config``),
    passed to timm's builder as well.

    Raises:
      ConversionError (one line): no classifier (``num_classes=0``), another number of input
        channels (``in_chans``), or any other difference: how many keys are missing, unexpected or of
        other shapes, the first of each, and which timm model jaxpull converts it matches.
    """
    family = models.get(arch)
    name = timm_name(arch)
    classifiers, first_conv = _classifiers(cfg), _first(cfg.get("first_conv") or "")
    num_classes = _num_classes(cfg, tensors)
    config: dict = {}
    if family.state_dict_config is not None:
        try:
            config = dict(family.state_dict_config(arch, tensors) or {})
        except ValueError as e:
            raise ConversionError(f"the state_dict is not timm's {name}: {e}") from None
    missing, unexpected, shaped = _differences(expected_shapes(arch, num_classes or 1000, config), tensors)
    if not (missing or unexpected or shaped):
        return int(num_classes), config
    heads = {f"{c}.{p}" for c in classifiers for p in ("weight", "bias")}
    if num_classes is None and set(missing) <= heads and not (unexpected or shaped):
        raise ConversionError(
            f"the state_dict has no classifier ({classifiers[0]}.weight): a timm {name} built with num_classes=0 "
            "is a feature extractor; jaxpull explains a classifier's logits"
        )
    if shaped == [f"{first_conv}.weight"] and not (missing or unexpected):
        channels = _shape(tensors[f"{first_conv}.weight"])[1]
        raise ConversionError(
            f"the state_dict is of a timm {name} built with in_chans={channels} ({first_conv}.weight has "
            f"{channels} input channel{'' if channels == 1 else 's'}): jaxpull explains RGB images (in_chans=3)"
        )
    parts = []
    if shaped:
        k = shaped[0]
        want = expected_shapes(arch, num_classes or 1000, config)[k]
        parts.append(f"{len(shaped)} of other shapes (first: {k} {_shape(tensors[k])} where {name} has {want})")
    if missing:
        parts.append(f"{len(missing)} missing (first: {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
    matches = identify(tensors, exclude=arch)
    hint = (
        f"it is a {matches[0]} state_dict: convert it as {matches[0]}"
        if matches
        else (f"it matches none of the timm models jaxpull converts ({', '.join(names())})")
    )
    raise ConversionError(f"the state_dict is not timm's {name}: tensors {'; '.join(parts)}; {hint}")


def resolve_tag(arch: str, weights: str | None) -> str:
    """timm's pretrained tag for ``--weights`` (None or ``DEFAULT``: timm's default; a tag such as
    ``in1k``, or ``<model name>.<tag>``); ConversionError listing the tags otherwise."""
    timm = timm_or_error()
    name = timm_name(arch)
    tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{name}.*") if "." in t]
    if weights is None or weights == "DEFAULT":
        return default_cfg(arch)["tag"]
    tag = weights[len(name) + 1 :] if weights.startswith(name + ".") else weights
    if tag not in tags:
        raise ConversionError(f"unknown timm weights {weights!r} for {arch}: use one of {', '.join(tags)} (or DEFAULT)")
    return tag


@contextlib.contextmanager
def _quiet(*loggers: str):
    """The named loggers' warnings held back (huggingface_hub logs every retry of a download)."""
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def pretrained(arch: str, tag: str) -> torch.nn.Module:
    """timm's model ``arch`` with its pretrained weights ``tag`` (downloaded through the Hugging
    Face hub, or from its local cache), in eval mode.

    Raises:
      RuntimeError: in one line, when timm cannot obtain them (no network access, ...).
    """
    timm = timm_or_error()
    full = f"{timm_name(arch)}.{tag}"
    try:
        with _quiet("huggingface_hub", "timm"):
            return timm.create_model(full, pretrained=True).eval()
    except Exception as e:  # the hub, the network and timm raise many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise RuntimeError(
            f"could not obtain timm's pretrained weights {full} ({type(e).__name__}{': ' + first if first else ''}); "
            f"without network access save them elsewhere (torch.save(timm.create_model({full!r}, pretrained=True)"
            ".state_dict(), 'weights.pth')) and use --state-dict FILE"
        ) from None


def torch_model(
    arch: str, tensors: Mapping[str, np.ndarray], num_classes: int, config: Mapping[str, Any] | None = None
) -> torch.nn.Module:
    """timm's model ``arch`` (``config``: builder options) with ``tensors`` loaded, in eval mode."""
    import torch

    timm = timm_or_error()
    module = timm.create_model(timm_name(arch), pretrained=False, num_classes=num_classes, **dict(config or {}))
    module.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in tensors.items()}, strict=True)
    return module.eval()


def _spec_with_cfg(model: Model, arch: str, cfg: Mapping[str, Any]) -> Model:
    """``model`` with the preprocessing and input normalisation of timm's ``pretrained_cfg``."""
    prep, mean, std = preprocessing(arch, cfg)
    return Model(model.params, dataclasses.replace(model.spec, preprocessing=prep, input_mean=mean, input_std=std))


def _record(cfg: Mapping[str, Any]) -> str:
    """The pretrained_cfg fields read, as JSON (what the file records)."""
    return json.dumps({k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items() if k in CFG_FIELDS})


def from_module(arch: str, module: torch.nn.Module, class_names: tuple[str, ...] = ()) -> Model:
    """Convert an in-memory timm model (e.g. ``timm.create_model("pvt_v2_b0")``): its sizes where the
    family reads them (``torch_config``), the preprocessing and normalisation of its ``pretrained_cfg``."""
    timm_name(arch)
    family = models.get(arch)
    config = family.torch_config(module) if family.torch_config is not None else None
    tensors = {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
    cfg = _cfg_dict(getattr(module, "pretrained_cfg", None) or default_cfg(arch))
    model = converter.from_state_dict(
        arch, tensors, class_names=class_names, metadata={"timm_pretrained_cfg": _record(cfg)}, config=config
    )
    return _spec_with_cfg(model, arch, cfg)


def convert(
    arch: str,
    out: os.PathLike,
    *,
    weights: str | None = None,
    state_dict: os.PathLike | None = None,
    image_size: int = 224,
    tolerance: float = converter.LOGIT_TOLERANCE,
    transform_input: bool | None = None,
) -> dict:
    """``jaxpull convert timm/<name>``: timm's pretrained weights (``weights``: a tag, default timm's
    default) or a state_dict file, checked against timm's model of that name, converted, checked
    against timm's model on the converted weights (two random ``image_size`` images), written to
    ``out`` with the preprocessing of timm's ``pretrained_cfg``. Every check runs before the file is
    written; each failure is one line.

    Returns:
      the metadata written, including ``parity_max_abs`` / ``parity_max_rel``.
    """
    timm_name(arch)
    if transform_input is not None:
        raise ConversionError(f"{arch} has no transform_input option: leave it unset")
    if weights is not None and state_dict is not None:
        raise ConversionError("give at most one of --weights TAG or --state-dict FILE")
    out = outputs.check_output(out, ".safetensors")  # before any download or compute
    if (
        isinstance(image_size, bool)
        or not isinstance(image_size, int)
        or not converter.MIN_IMAGE_SIZE <= image_size <= converter.MAX_IMAGE_SIZE
    ):
        raise ConversionError(
            f"image size {image_size!r} is out of range: use a whole number of pixels in "
            f"[{converter.MIN_IMAGE_SIZE}, {converter.MAX_IMAGE_SIZE}]"
        )
    timm = timm_or_error()
    import torch

    module = None
    if state_dict is None:
        tag = resolve_tag(arch, weights)
        module = pretrained(arch, tag)
        tensors = {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
        cfg = _cfg_dict(module.pretrained_cfg)
        where = cfg.get("hf_hub_id") or cfg.get("url") or "timm"
        source = f"timm {timm_name(arch)}.{tag} ({where})"
    else:
        path = Path(state_dict)
        if not path.is_file():
            raise FileNotFoundError(f"state_dict file {str(path)!r} not found")
        checkpoint, removed = unwrap(sources.read_state_dict(path))  # a training wrapper's prefix, removed
        tensors = checkpoint.tensors
        cfg = default_cfg(arch)
        source = f"state_dict {path.name} sha256:{offline.sha256(path)}"
    num_classes, config = check_state_dict(arch, tensors, cfg)
    preprocessing(arch, cfg)  # its errors before any compute
    metadata = {
        "source": source,
        "bn_folded": "true",
        "bn_note": "eval-mode BatchNorm folded into the preceding convolution, or stored as x*scale+bias",
        "converted_with": f"jaxpull {jaxpull.__version__}, torch {torch.__version__}, timm {timm.__version__}",
        "timm_pretrained_cfg": _record(cfg),
    }
    if state_dict is not None and removed:
        metadata["state_dict_note"] = unwrap_note(removed)
    model = converter.from_state_dict(arch, tensors, metadata=metadata, config=config)
    model = _spec_with_cfg(model, arch, cfg)
    if module is None:
        module = torch_model(arch, tensors, num_classes, config)
    return converter.checked_save(module, model, out, metadata, image_size, tolerance, reference="timm")
