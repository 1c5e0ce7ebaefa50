"""The paper's figure: rows of images; the clean image, then one cell per target label.

Each cell is x_K - x0, min-max normalised per cell to [0, 1] (so zero change shows as grey),
titled with the target's class name. Needs matplotlib (``pip install 'jaxpull[demo]'``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from jaxpull.files.images import to_pixels
from jaxpull.files.outputs import atomic_write


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
    for sub, (heading, diffs) in zip(subfigs, panels.items(), strict=True):
        _draw_grid(sub, images, np.asarray(diffs), titles, heading)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    finally:
        plt.close(fig)


def comparison_figure(
    images: np.ndarray,
    methods: Mapping[str, np.ndarray],
    column_titles: Sequence[str],
    image_names: Sequence[str],
    path: os.PathLike,
    *,
    own_columns: Sequence[int | None] = (),
    title: str = "",
    caption: str = "",
) -> None:
    """The paper's layout at full resolution, several methods per image: write a PNG atomically.

    One row per (image, method): the clean image, then x_K - x0 for each target label (min-max
    normalised per cell, so no change shows as grey), one pixel of the array per pixel of the
    PNG. The targets are shared by all images, so their class names form one title row. Each
    row is labelled with the image's name and the method; the cell of each image's own class
    (``own_columns[i]``, the diagonal) is framed.

    Args:
      images: clean images ``(N, H, W, 3)`` in [-1, 1].
      methods: row label -> diffs ``(N, K, H, W, 3)`` (e.g. "excitation" -> ..., "vanilla" -> ...).
      column_titles: the K class names.
      image_names: N names for the row labels.
      own_columns: per image, the column of its own class (or None).
      title, caption: a heading above and a short explanation below (wrapped to the width).
    """
    plt = _pyplot()
    n, h, w = images.shape[:3]
    k = len(column_titles)
    labels = list(methods)
    gap, group_gap, left, top = 4, 18, 230, 78 if title else 40
    cap_lines = _wrap(caption, (k + 1) * (w + gap) // 10) if caption else []
    bottom = 16 + 18 * len(cap_lines)
    width = left + (k + 1) * (w + gap) + 8
    height = top + n * len(labels) * (h + gap) + (n - 1) * group_gap + bottom
    dpi = 100
    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi)

    def box(x0, y0, bw, bh):  # pixels from the top left -> figure fraction
        return [x0 / width, 1 - (y0 + bh) / height, bw / width, bh / height]

    if title:
        fig.text(0.5, 1 - 14 / height, title, ha="center", va="top", fontsize=17, weight="bold")
    for j, name in enumerate(["image"] + list(column_titles)):
        fig.text(
            (left + j * (w + gap) + w / 2) / width,
            1 - (top - 8) / height,
            name,
            ha="center",
            va="bottom",
            fontsize=13,
            style="italic" if j == 0 else "normal",
        )
    y = top
    for i in range(n):
        for r, label in enumerate(labels):
            ax = fig.add_axes(box(left, y, w, h))
            ax.imshow(to_pixels(images[i]), interpolation="nearest")
            ax.set_axis_off()
            x_text, y_mid = (left - 10) / width, 1 - (y + h / 2) / height
            if r == 0:
                fig.text(
                    x_text, y_mid + 3 / height, image_names[i], ha="right", va="bottom", fontsize=13, weight="bold"
                )
            fig.text(
                x_text,
                y_mid - (3 / height if r == 0 else 0),
                label,
                ha="right",
                va="top" if r == 0 else "center",
                fontsize=12,
            )
            for j in range(k):
                ax = fig.add_axes(box(left + (j + 1) * (w + gap), y, w, h))
                ax.imshow(normalize_cell(methods[label][i, j]), interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                own = i < len(own_columns) and own_columns[i] == j
                for spine in ax.spines.values():
                    spine.set_visible(own)
                    spine.set(color="#d62728", linewidth=3)
            y += h + gap
        y += group_gap
    for m, line in enumerate(cap_lines):
        fig.text(left / width, 1 - (y - group_gap + 8 + 18 * m) / height, line, ha="left", va="top", fontsize=11)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    finally:
        plt.close(fig)


def _wrap(text: str, width: int) -> list:
    import textwrap

    return [line for para in text.split("\n") for line in (textwrap.wrap(para, width) or [""])]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("figures need matplotlib: pip install 'jaxpull[demo]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def short_name(name: str, limit: int = 22) -> str:
    """A class name short enough for a cell title."""
    name = name.split(",")[0]
    return name if len(name) <= limit else name[: limit - 1] + "…"
