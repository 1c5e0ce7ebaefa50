"""Reading a PyTorch state_dict into JAX layouts, recording every mismatch on the way.

``StateDict`` wraps a ``{key: numpy array}`` mapping. The architecture files call its small
layout rules (``conv_bn``, ``dense``, ``affine``); it transposes kernels (OIHW -> HWIO,
(out, in) -> (in, out)), folds eval-mode BatchNorm in float64, and keeps the lists of missing
and unused keys so that the converter can raise one error naming them all.
"""

from __future__ import annotations

import re
from typing import Dict, List, Mapping, Optional

import numpy as np

IGNORED = re.compile(r"(^|\.)num_batches_tracked$")


class StateDict:
    """A state_dict reader for the architectures' ``torch_layout`` functions."""

    def __init__(self, tensors: Mapping[str, np.ndarray]):
        self.tensors: Dict[str, np.ndarray] = {k: np.asarray(v) for k, v in tensors.items()}
        self.used: set = set()
        self.missing: List[str] = []
        self.ignored: List[str] = []  # keys dropped on purpose (see ``ignore``)

    def has(self, key: str) -> bool:
        return key in self.tensors

    def rename(self, pattern: str, replacement: str) -> None:
        """Rename keys matching the regex ``pattern`` (legacy spellings, e.g. DenseNet's ``norm.1``)."""
        rx = re.compile(pattern)
        self.tensors = {rx.sub(replacement, k): v for k, v in self.tensors.items()}

    def ignore(self, pattern: str) -> List[str]:
        """Drop the keys matching the regex ``pattern`` on purpose (training-only heads such as
        GoogLeNet's ``aux1``): recorded in ``ignored``, neither used nor reported as unexpected."""
        rx = re.compile(pattern)
        dropped = [k for k in self.tensors if rx.search(k)]
        for k in dropped:
            del self.tensors[k]
        self.ignored += dropped
        return dropped

    def get(self, key: str) -> Optional[np.ndarray]:
        """The tensor at ``key`` as float64, or None (and ``key`` recorded as missing)."""
        if key not in self.tensors:
            self.missing.append(key)
            return None
        self.used.add(key)
        return self.tensors[key].astype(np.float64)

    def _bn(self, prefix: str, eps: float):
        w, b = self.get(f"{prefix}.weight"), self.get(f"{prefix}.bias")
        mean, var = self.get(f"{prefix}.running_mean"), self.get(f"{prefix}.running_var")
        if any(a is None for a in (w, b, mean, var)):
            return None
        scale = w / np.sqrt(var + eps)
        return scale, b - mean * scale

    def conv_bn(self, conv: str, bn: Optional[str], eps: float = 1e-5) -> dict:
        """A convolution (OIHW -> HWIO) with the eval-mode BatchNorm ``bn`` (if any) folded in."""
        kernel = self.get(f"{conv}.weight")
        bias = self.get(f"{conv}.bias") if self.has(f"{conv}.bias") else None
        out = {}
        if bn is not None:
            folded = self._bn(bn, eps)
            if folded is not None and kernel is not None:
                scale, shift = folded
                kernel = kernel * scale[:, None, None, None]
                bias = shift + (0.0 if bias is None else bias * scale)
        if kernel is not None:
            out["kernel"] = np.transpose(kernel, (2, 3, 1, 0)).astype(np.float32)
        if bias is not None:
            out["bias"] = bias.astype(np.float32)
        return out

    def dense(self, prefix: str) -> dict:
        """A ``torch.nn.Linear``: kernel (out, in) -> (in, out), and its bias."""
        w, b = self.get(f"{prefix}.weight"), self.get(f"{prefix}.bias")
        out = {}
        if w is not None:
            out["kernel"] = w.T.astype(np.float32)
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

    def unused(self) -> List[str]:
        """Keys no layout rule read (``num_batches_tracked`` excepted)."""
        return [k for k in self.tensors if k not in self.used and not IGNORED.search(k)]
