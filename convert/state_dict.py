"""Reading a PyTorch state_dict into JAX layouts, recording every mismatch on the way.

``Checkpoint`` is what a state_dict file holds: its tensors and torch's ``_metadata`` (the
version each module was saved with, which some modules' loading reads: MNASNet's stem).
``unwrap`` removes the key prefix a training wrapper adds to every key.

``StateDict`` wraps a ``{key: numpy array}`` mapping. The architecture files call its small
layout rules (``conv_bn``, ``dense``, ``affine``); it transposes kernels (OIHW -> HWIO,
(out, in) -> (in, out)), folds eval-mode BatchNorm in float64, and keeps the lists of missing
and unused keys so that the converter can raise one error naming them all.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np

IGNORED = re.compile(r"(^|\.)num_batches_tracked$")

# Prefixes a wrapper adds to every key of the model it wraps: DataParallel / DistributedDataParallel
# keep the model as ``module``, torch.compile's OptimizedModule as ``_orig_mod``.
WRAPPER_PREFIXES = {"module.": "DataParallel / DistributedDataParallel", "_orig_mod.": "torch.compile"}


class Checkpoint(NamedTuple):
    """A state_dict as read from a file.

    ``tensors``: key -> array, in the file's order. ``metadata``: torch's ``state_dict._metadata``,
    module prefix (``""`` for the model itself) -> ``{"version": n, ...}``; empty when the file
    has none (a ``.safetensors`` file, a dict built by hand).
    """

    tensors: dict[str, np.ndarray]
    metadata: Mapping[str, Mapping[str, Any]] = MappingProxyType({})


def plain_metadata(raw: Any) -> dict[str, dict[str, Any]]:
    """torch's ``_metadata`` reduced to what it may hold: module prefix (a string) -> entries whose
    values are numbers, strings or booleans (anything else in the file is dropped)."""
    if not isinstance(raw, Mapping):
        return {}
    plain = lambda v: isinstance(v, (int, float, str, bool))
    return {
        str(k): {str(n): v for n, v in entries.items() if isinstance(n, str) and plain(v)}
        for k, entries in raw.items()
        if isinstance(k, str) and isinstance(entries, Mapping)
    }


def unwrap(checkpoint: Checkpoint) -> tuple[Checkpoint, str]:
    """``(checkpoint without the wrapper prefix, the prefix removed)``: while every key starts with
    one of ``WRAPPER_PREFIXES`` (nested wrappers: ``_orig_mod.module.``), it is removed from the
    keys and from the metadata's module prefixes; ``""`` if none was."""
    tensors, metadata, removed = checkpoint.tensors, dict(checkpoint.metadata), ""
    while tensors:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in tensors)), None)
        if prefix is None:
            break
        tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
        inner = prefix[:-1]  # the wrapped model's own metadata is the wrapper's "module" entry
        metadata = {
            ("" if k == inner else k[len(prefix) :]): v
            for k, v in metadata.items()
            if k == inner or k.startswith(prefix)
        }
        removed += prefix
    return Checkpoint(tensors, metadata), removed


def unwrap_note(removed: str) -> str:
    """The conversion report's sentence for a removed prefix (``unwrap``)."""
    wrappers = " of ".join(WRAPPER_PREFIXES[p + "."] for p in removed.split(".")[:-1])
    return f"removed the key prefix {removed!r} ({wrappers}) from every key of the state_dict"


class StateDict:
    """A state_dict reader for the architectures' ``torch_layout`` functions."""

    def __init__(self, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, Mapping] | None = None):
        self.tensors: dict[str, np.ndarray] = {k: np.asarray(v) for k, v in tensors.items()}
        self.metadata: dict[str, Mapping] = dict(metadata or {})  # torch's _metadata (see Checkpoint)
        self.used: set = set()
        self.missing: list[str] = []
        self.ignored: list[str] = []  # keys dropped on purpose (see ``ignore``)

    def has(self, key: str) -> bool:
        return key in self.tensors

    def rename(self, pattern: str, replacement: str) -> None:
        """Rename keys matching the regex ``pattern`` (legacy spellings, e.g. DenseNet's ``norm.1``)."""
        rx = re.compile(pattern)
        self.tensors = {rx.sub(replacement, k): v for k, v in self.tensors.items()}

    def ignore(self, pattern: str) -> list[str]:
        """Drop the keys matching the regex ``pattern`` on purpose (training-only heads such as
        GoogLeNet's ``aux1``): recorded in ``ignored``, neither used nor reported as unexpected."""
        rx = re.compile(pattern)
        dropped = [k for k in self.tensors if rx.search(k)]
        for k in dropped:
            del self.tensors[k]
        self.ignored += dropped
        return dropped

    def get(self, key: str) -> np.ndarray | None:
        """The tensor at ``key`` as float64, or None (and ``key`` recorded as missing)."""
        value = self.stored(key)
        return None if value is None else value.astype(np.float64)

    def stored(self, key: str) -> np.ndarray | None:
        """The tensor at ``key`` in its stored dtype, or None (and ``key`` recorded as missing): for
        layouts that only move values (a float32 result is the same as through float64, without
        the float64 copy: VGG's 100M-parameter classifier)."""
        if key not in self.tensors:
            self.missing.append(key)
            return None
        self.used.add(key)
        return self.tensors[key]

    def _bn(self, prefix: str, eps: float):
        w, b = self.get(f"{prefix}.weight"), self.get(f"{prefix}.bias")
        mean, var = self.get(f"{prefix}.running_mean"), self.get(f"{prefix}.running_var")
        if any(a is None for a in (w, b, mean, var)):
            return None
        scale = w / np.sqrt(var + eps)
        return scale, b - mean * scale

    def conv_bn(self, conv: str, bn: str | None, eps: float = 1e-5) -> dict:
        """A convolution (OIHW -> HWIO) with the eval-mode BatchNorm ``bn`` (if any) folded in
        (in float64; without one the values are only moved)."""
        read = self.get if bn is not None else self.stored
        kernel = read(f"{conv}.weight")
        bias = read(f"{conv}.bias") if self.has(f"{conv}.bias") else None
        out = {}
        if bn is not None:
            folded = self._bn(bn, eps)
            if folded is not None and kernel is not None:
                scale, shift = folded
                kernel = kernel * scale[:, None, None, None]
                bias = shift + (0.0 if bias is None else bias * scale)
        if kernel is not None:
            out["kernel"] = np.transpose(kernel, (2, 3, 1, 0)).astype(np.float32, order="C")
        if bias is not None:
            out["bias"] = bias.astype(np.float32)
        return out

    def dense(self, prefix: str) -> dict:
        """A ``torch.nn.Linear``: kernel (out, in) -> (in, out), and its bias."""
        w, b = self.stored(f"{prefix}.weight"), self.stored(f"{prefix}.bias")
        out = {}
        if w is not None:
            out["kernel"] = w.T.astype(np.float32, order="C")  # one copy, in the layout JAX keeps
        if b is not None:
            out["bias"] = b.astype(np.float32)
        return out

    def affine(self, bn: str, eps: float = 1e-5) -> dict:
        """A BatchNorm with no convolution before it, as ``x * scale + bias``."""
        folded = self._bn(bn, eps)
        if folded is None:
            return {}
        scale, shift = folded
        return {"scale": scale.astype(np.float32), "bias": shift.astype(np.float32)}

    def unused(self) -> list[str]:
        """Keys no layout rule read (``num_batches_tracked`` excepted)."""
        return [k for k in self.tensors if k not in self.used and not IGNORED.search(k)]
