"""The paper's figure: rows of images; the clean image, then one cell per target label.

Each cell is x_K - x0, min-max normalised per cell to [0, 1] (so zero change shows as grey),
titled with the target's class name. Needs matplotlib (``pip install 'jaxpull[demo]'``).
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence, Tuple

import numpy as np

from jaxpull.images import to_pixels
from jaxpull.io import atomic_write


def normalize_cell(d: np.ndarray) -> np.ndarray:
    """Min-max normalise one ``(H, W, 3)`` difference to [0, 1] (constant -> 0.5 grey)."""
    d = np.asarray(d, np.float64)
    lo, hi = d.min(), d.max()
    if hi - lo < 1e-12:
        return np.full(d.shape, 0.5)
    return (d - lo) / (hi - lo)


def _draw_grid(fig, images: np.ndarray, diffs: np.ndarray, titles: Sequence[Sequence[str]], heading: str) -> None:
    n, k = diffs.shape[:2]
    axes = fig.subplots(n, k + 1, squeeze=False, gridspec_kw=dict(wspace=0.03, hspace=0.12))
    fig.suptitle(heading, fontsize=11)
    for i in range(n):
        axes[i, 0].imshow(to_pixels(images[i]))
        axes[i, 0].set_title("original" if i == 0 else "", fontsize=8)
        for j in range(k):
            axes[i, j + 1].imshow(normalize_cell(diffs[i, j]))
            axes[i, j + 1].set_title(titles[i][j], fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])


def explanation_figure(
    images: np.ndarray,
    panels: Mapping[str, np.ndarray],
    titles: Sequence[Sequence[str]],
    path: os.PathLike,
    dpi: int = 100,
) -> None:
    """Write the figure to ``path`` (PNG, atomically).

    Args:
      images: clean images ``(N, H, W, 3)`` in [-1, 1].
      panels: heading -> diffs ``(N, K, H, W, 3)``; several panels are drawn side by side.
      titles: ``titles[i][j]``, the label of image i's j-th target.
    """
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("figures need matplotlib: pip install 'jaxpull[demo]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, k = next(iter(panels.values())).shape[:2]
    cell = 1.6
    fig = plt.figure(figsize=(len(panels) * (k + 1) * cell, n * cell * 1.12 + 0.5))
    subfigs = fig.subfigures(1, len(panels), squeeze=False, wspace=0.02)[0]
    for sub, (heading, diffs) in zip(subfigs, panels.items()):
        _draw_grid(sub, images, np.asarray(diffs), titles, heading)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    finally:
        plt.close(fig)


def short_name(name: str, limit: int = 22) -> str:
    """A class name short enough for a cell title."""
    name = name.split(",")[0]
    return name if len(name) <= limit else name[: limit - 1] + "…"
