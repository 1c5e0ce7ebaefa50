"""Converted-model files: one ``.safetensors`` with the parameters and string metadata.

Keys are the parameter tree's paths joined with ``/`` (``layer1/0/conv1/kernel``). Metadata
(all strings) holds ``format`` (``jaxpull/1``), ``arch``, ``num_classes``, ``input_mean``,
``input_std``, ``class_names`` (JSON), ``crop_size`` / ``resize_size`` / ``interpolation``
(the images its weights expect), ``transform_input`` (GoogLeNet, Inception-v3), ``source``,
``bn_folded`` and the parity error measured at conversion. Writes go to a temporary file that is renamed into place, so an interrupted
write never leaves a partial file. Loading needs neither torch nor torchvision.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np
from flax import traverse_util

from jaxpull.core import models
from jaxpull.core.model import Model, ModelSpec, param_shapes
from jaxpull.core.preprocessing import Preprocessing
from jaxpull.files.outputs import atomic_write

FORMAT = "jaxpull/1"
PathLike = str | os.PathLike


class ModelFileError(ValueError):
    """A converted-model file that cannot be used; the message says why and what to do."""


def save(model: Model, path: PathLike, extra_metadata: Mapping[str, str] | None = None) -> None:
    """Write ``model`` to ``path`` (``.safetensors``), atomically."""
    from safetensors.numpy import save_file

    spec = model.spec
    flat = traverse_util.flatten_dict(jax.device_get(model.params), sep="/")
    tensors = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in flat.items()}
    meta = dict(spec.metadata)
    meta.update(dict(extra_metadata or {}))
    meta.update(
        format=FORMAT,
        arch=spec.arch,
        num_classes=str(spec.num_classes),
        input_mean=json.dumps(list(spec.input_mean)),
        input_std=json.dumps(list(spec.input_std)),
        class_names=json.dumps(list(spec.class_names)),
        **spec.preprocessing.to_metadata(),
    )
    if models.get(spec.arch).transform_input is not None:
        meta["transform_input"] = "true" if spec.transform_input else "false"
    if spec.config:
        meta["config"] = json.dumps(dict(spec.config))
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load(path: PathLike) -> Model:
    """Read a converted model; raise :class:`ModelFileError` naming the problem if it is unusable.

    Args:
      path: a ``.safetensors`` file written by ``jaxpull convert``.
    Returns:
      a :class:`~jaxpull.core.model.Model`; ``model(x)`` takes ``(N, H, W, 3)`` in [-1, 1].
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.is_dir():
        raise ModelFileError(f"model file {str(path)!r} is a directory: give the .safetensors file inside it")
    if not path.is_file():
        raise ModelFileError(f"model file {str(path)!r} not found: convert one with `jaxpull convert`")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            flat = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFileError(
            f"{str(path)!r} is not a readable safetensors file ({e}); it may be truncated: convert it again"
        ) from None
    if meta.get("format") != FORMAT:
        raise ModelFileError(
            f"{str(path)!r} is not a jaxpull model file (format {meta.get('format')!r}, expected {FORMAT!r}): "
            "convert it with `jaxpull convert`"
        )
    try:
        spec = _spec_from_metadata(meta)
    except (KeyError, ValueError, TypeError) as e:
        raise ModelFileError(f"{str(path)!r} has invalid metadata ({e}): convert it again") from None
    check_tensors(flat, str(path))
    params = traverse_util.unflatten_dict(flat, sep="/")
    try:
        check_params(params, spec, str(path))
    except (ValueError, TypeError) as e:  # the builder refuses the recorded options (a ViT's patch size)
        if isinstance(e, ModelFileError):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelFileError(f"{str(path)!r} has invalid metadata ({first}): convert it again") from None
    return Model.from_numpy(params, spec)


def _spec_from_metadata(meta: Mapping[str, str]) -> ModelSpec:
    """The ModelSpec a file's metadata describes; ValueError naming the first bad field.

    ``num_classes`` must be a whole number >= 1, ``input_mean`` / ``input_std`` three finite
    numbers (std > 0), ``class_names`` a list of num_classes strings (or empty), ``crop_size`` /
    ``resize_size`` within the image size bounds (:mod:`jaxpull.core.preprocessing`), ``config``
    the family's builder options with values of their types (``Family.check_config``).
    """
    models.get(meta.get("arch", ""))
    text = meta["num_classes"]
    if not text.strip().isdigit() or int(text) < 1:
        raise ValueError(f"num_classes {text!r} is not a whole number >= 1")
    num_classes = int(text)
    stats: dict[str, tuple[float, float, float]] = {}
    for name in ("input_mean", "input_std"):
        value = json.loads(meta[name])
        if (
            not isinstance(value, list)
            or len(value) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in value)
        ):
            raise ValueError(f"{name} {meta[name]!r} is not three finite numbers")
        stats[name] = (float(value[0]), float(value[1]), float(value[2]))
    if min(stats["input_std"]) <= 0:
        raise ValueError(f"input_std {meta['input_std']!r} must be positive (it divides the input)")
    names = json.loads(meta.get("class_names", "[]"))
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError("class_names is not a list of strings")
    if names and len(names) != num_classes:
        raise ValueError(f"class_names has {len(names)} names for num_classes {num_classes}")
    transform = meta.get("transform_input", "false")
    if transform not in ("true", "false"):
        raise ValueError(f"transform_input {transform!r} is not true or false")
    config = json.loads(meta.get("config", "{}"))
    if not isinstance(config, dict):
        raise ValueError(f"config {meta['config']!r} is not a mapping of builder options to values")
    return ModelSpec(
        arch=meta["arch"],
        num_classes=num_classes,
        input_mean=stats["input_mean"],
        input_std=stats["input_std"],
        class_names=tuple(names),
        metadata=meta,
        transform_input=transform == "true",
        preprocessing=Preprocessing.from_metadata(meta),
        config=tuple(config.items()),  # checked by ModelSpec against the family's options
    )


def check_tensors(flat: Mapping[str, np.ndarray], where: str) -> None:
    """Raise one ModelFileError if a tensor is not floating point or holds NaN / infinity."""
    problems = [
        f"{k} has dtype {v.dtype} (weights must be floating point)"
        for k, v in flat.items()
        if not np.issubdtype(v.dtype, np.floating)
    ]
    problems += [
        f"{k} holds NaN or infinite values"
        for k, v in flat.items()
        if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all()
    ]
    if problems:
        raise ModelFileError(f"{where} cannot give meaningful output: {summarize(problems)}; convert it again")


def param_problems(params, spec: ModelSpec) -> list:
    """Every missing, unexpected or wrongly shaped parameter of ``params`` for ``spec``, as text."""
    expected = traverse_util.flatten_dict(param_shapes(spec), sep="/")
    got = traverse_util.flatten_dict(params, sep="/")
    problems = [f"missing {k}" for k in expected if k not in got]
    problems += [f"unexpected {k}" for k in got if k not in expected]
    problems += [
        f"{k} has shape {tuple(got[k].shape)}, expected {tuple(expected[k].shape)}"
        for k in expected
        if k in got and tuple(got[k].shape) != tuple(expected[k].shape)
    ]
    return problems


def summarize(problems: list, limit: int = 20) -> str:
    """Join problems into one line, eliding past ``limit``."""
    more = f"; ... ({len(problems)} problems)" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more


def check_params(params, spec: ModelSpec, where: str) -> None:
    """Raise one ModelFileError listing every missing, unexpected or wrongly shaped parameter."""
    problems = param_problems(params, spec)
    if problems:
        raise ModelFileError(f"{where} does not match architecture {spec.arch}: {summarize(problems)}")
