"""Fingerprints of known checkpoints: what torch's model outputs on a fixed synthetic input.

Without torch, a conversion cannot be compared with the torch model, so it is compared with a
record made with torch instead: for each known checkpoint (keyed by the file's sha256), the top-10
logits of two deterministic synthetic 224x224 images and three checksums over all logits,
committed in ``fingerprints.json``. ``tests/test_pth.py`` regenerates every record with torch and
compares it with the committed one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FILE = Path(__file__).with_name("fingerprints.json")
TOP = 10


def synthetic_images(size: int = 224) -> np.ndarray:
    """Two deterministic ``(2, size, size, 3)`` float32 images in [-1, 1]: smooth colour patterns."""
    u = np.linspace(0.0, 1.0, size, dtype=np.float64)
    yy, xx = np.meshgrid(u, u, indexing="ij")
    a = np.stack([np.sin(6.0 * xx + 2.0 * yy), np.cos(5.0 * yy - 3.0 * xx), np.sin(9.0 * xx * yy + 1.0)], -1)
    r = np.hypot(xx - 0.45, yy - 0.55)
    b = np.stack([np.cos(25.0 * r), np.sign(np.sin(14.0 * xx)) * 0.6, np.tanh(4.0 * (yy - xx))], -1)
    return np.stack([a, b]).astype(np.float32)


def _weights(n: int) -> np.ndarray:
    return np.cos(0.7 * np.arange(n))


def summarize(logits: np.ndarray) -> dict:
    """Top-10 (index, logit) per image and checksums (mean, std, a fixed cosine projection) of all."""
    logits = np.asarray(logits, np.float64)
    out = {"top": [], "mean": [], "std": [], "projection": []}
    for row in logits:
        idx = np.argsort(-row)[:TOP]
        out["top"].append([[int(i), round(float(row[i]), 6)] for i in idx])
        out["mean"].append(round(float(row.mean()), 6))
        out["std"].append(round(float(row.std()), 6))
        out["projection"].append(round(float(row @ _weights(row.size) / np.sqrt(row.size)), 6))
    return out


def error(logits: np.ndarray, record: dict) -> dict:
    """Largest difference between ``logits`` ``(2, C)`` and a record, relative to its largest logit.

    Returns ``{"max_abs", "max_rel", "scale"}`` like :func:`jaxpull_convert.logit_parity`.
    """
    logits = np.asarray(logits, np.float64)
    diffs = []
    for row, top, mean, std, proj in zip(
        logits, record["top"], record["mean"], record["std"], record["projection"], strict=True
    ):
        diffs += [abs(row[i] - v) for i, v in top]
        diffs += [
            abs(row.mean() - mean),
            abs(row.std() - std),
            abs(row @ _weights(row.size) / np.sqrt(row.size) - proj),
        ]
    scale = max(abs(v) for top in record["top"] for _, v in top)
    max_abs = float(max(diffs)) if len(logits) == len(record["top"]) else float("inf")
    return {"max_abs": max_abs, "max_rel": max_abs / max(1.0, scale), "scale": scale}


def load_all() -> dict[str, dict]:
    """sha256 -> record, from the committed file."""
    return json.loads(FILE.read_text())["checkpoints"]


def lookup(sha256: str) -> dict | None:
    """The record of the checkpoint with this sha256, or None."""
    return load_all().get(sha256)


def record(arch: str, source: str, torch_logits: np.ndarray, size: int = 224) -> dict:
    """A record for ``fingerprints.json`` from torch's logits on :func:`synthetic_images`."""
    return {"arch": arch, "source": source, "input": f"fingerprint.synthetic_images({size})", **summarize(torch_logits)}
