"""Which labels to explain: label lists, each image's top-n, and the paper's figure layout.

Pure NumPy over logits and a model's class names; used by the command line, the demo, the
notebook and the app alike, so each rule is written once.
"""

from __future__ import annotations

import numpy as np

from jaxpull.core import checks
from jaxpull.core.model import Model


def resolve_targets(model: Model, logits: np.ndarray, spec: str) -> np.ndarray:
    """Targets per image from a comma list of class indices, class names or ``topN``.

    ``"0,goldfish,top3"`` with ``logits`` ``(N, C)`` -> int32 ``(N, K)``: label 0, goldfish, then
    each image's three most probable labels. ValueError for an empty list, an unknown name or
    an n outside ``[1, C]``.
    """
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise ValueError("--targets is empty: give labels such as 0,goldfish,top3")
    columns: list[np.ndarray] = []
    order = np.argsort(-logits, axis=1)
    for item in items:
        if item.lower().startswith("top") and item[3:].isdigit():
            n = int(item[3:])
            if not 1 <= n <= model.num_classes:
                raise ValueError(f"--targets {item}: n must be in [1, {model.num_classes}]")
            columns.extend(order[:, i] for i in range(n))
        else:
            columns.append(np.full(len(logits), model.label(item)))
    return np.stack(columns, axis=1).astype(np.int32)


def parse_labels(spec: str, model: Model) -> list[int]:
    """``"all"``, a range ``"0-99"``, or a comma list of indices, class names and ranges -> indices."""
    if spec.strip().lower() == "all":
        return list(range(model.num_classes))
    labels: list[int] = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        lo, sep, hi = item.partition("-")
        if sep and lo.isdigit() and hi.isdigit():
            labels.extend(range(model.label(lo), model.label(hi) + 1))
        else:
            labels.append(model.label(item))
    if not labels:
        raise ValueError("--labels is empty: give all, a range such as 0-99, or a list")
    return labels


def paper_layout(logits: np.ndarray, seed: int = 0) -> tuple[np.ndarray, list[int]]:
    """The paper's figure columns for ``N`` images: each image's own top-1 label once, then one
    random other label, shared by every row.

    So every cell of a column but its own image's is a counterfactual. ``logits`` ``(N, C)`` ->
    ``(targets (K,) int32, own_columns)``: ``own_columns[i]`` is image i's own column (framed).
    """
    checks.seed(seed)
    top1 = [int(i) for i in np.argmax(logits, axis=1)]
    own = list(dict.fromkeys(top1))
    others = [c for c in range(logits.shape[1]) if c not in own]
    extra = [int(np.random.default_rng(seed).choice(others))] if others else []
    return np.array(own + extra, np.int32), [own.index(i) for i in top1]


def top5_lines(model: Model, names: list[str], logits: np.ndarray) -> list[str]:
    """``"name: tabby (281) 38.2%; ..."`` per image: its five most probable labels."""
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    return [
        f"{name}: " + "; ".join(f"{model.class_name(i)} ({i}) {p[i]:.1%}" for i in np.argsort(-p)[:5])
        for name, p in zip(names, probs, strict=True)
    ]
