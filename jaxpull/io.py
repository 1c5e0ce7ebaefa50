"""Converted-model files: one ``.safetensors`` with the parameters and string metadata.

Keys are the parameter tree's paths joined with ``/`` (``layer1/0/conv1/kernel``). Metadata
(all strings) holds ``format`` (``jaxpull/1``), ``arch``, ``num_classes``, ``input_mean``,
``input_std``, ``class_names`` (JSON), ``source``, ``bn_folded`` and the parity error measured
at conversion. Writes go to a temporary file that is renamed into place, so an interrupted
write never leaves a partial file. Loading needs neither torch nor torchvision.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Mapping, Union

import jax
import numpy as np
from flax import traverse_util

from jaxpull import models
from jaxpull.model import Model, ModelSpec, param_shapes

FORMAT = "jaxpull/1"
PathLike = Union[str, os.PathLike]


class ModelFileError(ValueError):
    """A converted-model file that cannot be used; the message says why and what to do."""


def atomic_write(path: PathLike, write) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path`` (same directory)."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise FileNotFoundError(f"output directory {str(directory)!r} does not exist: create it first")
    if not os.access(directory, os.W_OK):
        raise PermissionError(f"output directory {str(directory)!r} is not writable: choose another -o path")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_arrays(path: PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` to the ``.npz`` file ``path`` atomically (nothing half-written is left)."""

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to the temporary name
            np.savez(f, **arrays)

    atomic_write(path, write)


def save(model: Model, path: PathLike, extra_metadata: Mapping[str, str] = ()) -> None:
    """Write ``model`` to ``path`` (``.safetensors``), atomically."""
    from safetensors.numpy import save_file

    spec = model.spec
    flat = traverse_util.flatten_dict(jax.device_get(model.params), sep="/")
    tensors = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in flat.items()}
    meta = dict(spec.metadata)
    meta.update(dict(extra_metadata))
    meta.update(
        format=FORMAT,
        arch=spec.arch,
        num_classes=str(spec.num_classes),
        input_mean=json.dumps(list(spec.input_mean)),
        input_std=json.dumps(list(spec.input_std)),
        class_names=json.dumps(list(spec.class_names)),
    )
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load(path: PathLike) -> Model:
    """Read a converted model; raise :class:`ModelFileError` naming the problem if it is unusable.

    Args:
      path: a ``.safetensors`` file written by ``jaxpull convert``.
    Returns:
      a :class:`~jaxpull.model.Model`; ``model(x)`` takes ``(N, H, W, 3)`` in [-1, 1].
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
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
        models.get(meta.get("arch", ""))
        spec = ModelSpec(
            arch=meta["arch"],
            num_classes=int(meta["num_classes"]),
            input_mean=tuple(json.loads(meta["input_mean"])),
            input_std=tuple(json.loads(meta["input_std"])),
            class_names=tuple(json.loads(meta.get("class_names", "[]"))),
            metadata=meta,
        )
    except (KeyError, ValueError) as e:
        raise ModelFileError(f"{str(path)!r} has invalid metadata ({e}): convert it again") from None
    params = traverse_util.unflatten_dict(flat, sep="/")
    check_params(params, spec, str(path))
    return Model(jax.tree_util.tree_map(jax.numpy.asarray, params), spec)


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
