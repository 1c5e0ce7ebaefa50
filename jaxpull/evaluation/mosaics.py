"""2x2 mosaics for the Focus metric (Arias-Duart et al. 2022), in two protocols.

* :func:`make_mosaics`: jaxpull's own quick protocol. Every image is shrunk to a tile by 2x2
  averaging, target classes cycle through the classes, two images of the target class (the same
  one twice if it has only one) and two of two other, distinct classes.
* :func:`make_paper_mosaics`: the protocol of the paper's ``evaluate_focus.py``. Each tile is its
  source image resized to ``tile`` pixels (bilinear with antialiasing, as
  ``torch.nn.functional.interpolate(..., mode="bilinear", antialias=True)``); per mosaic a target
  class is drawn uniformly, ONE image of it fills two random quadrants, and the two other
  quadrants hold images of two distractor classes drawn (with replacement) among the others,
  everything from ``numpy.random.default_rng(314)`` in their order of draws, so the same seed and
  the same dataset order give the same mosaics. ``distinct_images=True`` is the original Focus
  paper's variant: two *different* images of the target class.

Quadrants are numbered row-major: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right, as
Quantus' ``build_single_mosaic`` places its four images and as ``quantus.Focus`` reads its flags.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np

from jaxpull.core import checks

# The paper's tile size (224-pixel mosaics of four 112-pixel tiles) and its seed.
PAPER_TILE = 112
PAPER_SEED = 314


class Mosaics(NamedTuple):
    """2x2 mosaics: ``images`` ``(M, H, W, 3)``, ``targets`` ``(M,)`` class of the target tiles,
    ``quadrants`` ``(M, 4)`` bool (top-left, top-right, bottom-left, bottom-right: True where a
    target tile is), ``sources`` ``(M, 4)`` index of the image in each quadrant."""

    images: np.ndarray
    targets: np.ndarray
    quadrants: np.ndarray
    sources: np.ndarray


class MosaicPlan(NamedTuple):
    """Which images go where, before any pixel is touched: ``targets`` ``(M,)``, ``quadrants``
    ``(M, 4)`` bool and ``sources`` ``(M, 4)`` image indices, as in :class:`Mosaics`."""

    targets: np.ndarray
    quadrants: np.ndarray
    sources: np.ndarray


def _tile_grid(tiles: np.ndarray) -> np.ndarray:
    """``(M, 4, h, w, 3)`` tiles in row-major quadrant order -> ``(M, 2h, 2w, 3)`` mosaics."""
    top = np.concatenate([tiles[:, 0], tiles[:, 1]], axis=2)
    bottom = np.concatenate([tiles[:, 2], tiles[:, 3]], axis=2)
    return np.concatenate([top, bottom], axis=1)


def make_mosaics(images: np.ndarray, classes: Sequence[int], count: int, seed: int = 0) -> Mosaics:
    """Build ``count`` Focus mosaics from ``images`` ``(M, H, W, 3)`` (H, W even) of ``classes`` ``(M,)``.

    Each mosaic: a target class, two of its images (the same one twice if it has only one) in two
    random quadrants, two images of two other, distinct classes in the rest; every image is
    shrunk to a (H/2, W/2) tile by 2x2 averaging. Target classes cycle through the classes.
    """
    images = np.asarray(images, np.float32)
    classes = np.asarray(classes)
    if images.ndim != 4 or images.shape[1] % 2 or images.shape[2] % 2:
        raise ValueError(f"mosaic images must be (M, H, W, 3) with even H and W, got {images.shape}")
    if classes.shape != (images.shape[0],):
        raise ValueError(f"need one class per image: {images.shape[0]} images, {classes.shape} classes")
    distinct = np.unique(classes)
    if len(distinct) < 3:
        raise ValueError(
            f"Focus mosaics need images of at least 3 distinct classes, got {len(distinct)}: add images of other classes"
        )
    if count < 1:
        raise ValueError(f"the number of mosaics must be positive, got {count}")
    rng = np.random.default_rng(seed)
    m, h, w, _ = images.shape
    tiles = images.reshape(m, h // 2, 2, w // 2, 2, 3).mean(axis=(2, 4))
    targets, quadrants, sources = [], [], []
    for i in range(count):
        c = distinct[i % len(distinct)]
        own = np.flatnonzero(classes == c)
        pair = rng.choice(own, 2, replace=len(own) < 2)
        others = rng.choice(distinct[distinct != c], 2, replace=False)
        fill = [rng.choice(np.flatnonzero(classes == o)) for o in others]
        where = np.zeros(4, bool)
        where[rng.choice(4, 2, replace=False)] = True
        order = np.empty(4, int)
        order[where] = pair
        order[~where] = fill
        targets.append(c)
        quadrants.append(where)
        sources.append(order)
    sources = np.stack(sources)
    return Mosaics(_tile_grid(tiles[sources]), np.asarray(targets), np.stack(quadrants), sources)


# --------------------------------------------------------------------------------------
# The paper's protocol
# --------------------------------------------------------------------------------------


def _class_index(classes) -> dict:
    """class -> ascending indices of its images, for a ``(M,)`` integer array of classes."""
    classes = np.asarray(classes)
    if classes.ndim != 1 or classes.size == 0:
        raise ValueError(f"classes must be a non-empty (M,) array, one class per image, got shape {classes.shape}")
    if not np.issubdtype(classes.dtype, np.integer):
        raise ValueError(f"classes must be integer class indices, got dtype {classes.dtype}")
    return {int(c): np.flatnonzero(classes == c).tolist() for c in np.unique(classes)}


def plan_paper_mosaics(
    classes: Sequence[int], count: int, seed: int = PAPER_SEED, distinct_images: bool = False
) -> MosaicPlan:
    """Draw the layout of ``count`` mosaics of the paper's Focus protocol from the images' ``classes`` ``(M,)``.

    With ``rng = numpy.random.default_rng(seed)``, per mosaic and in this order:
    ``target = rng.choice(C)`` (C the sorted distinct classes), two distractor classes
    ``rng.choice(C[C != target], 2, replace=True)``, the target image ``rng.choice(I[target])``
    (I[c] the ascending indices of class c's images), one image of each distractor class
    ``rng.choice(I[d])``, and the two target quadrants ``rng.choice(4, 2, replace=False)``; the
    distractors fill the other two quadrants in row-major order. This is the order of
    ``build_focus_mosaics`` in the paper's ``evaluate_focus.py``: for the same classes in the
    same order (their dataset's ``targets``) it draws the same mosaics.

    ``distinct_images=True`` (the original Focus paper): the target image draw becomes
    ``rng.choice(I[target], 2, replace=False)``, two different images, the first in the first
    target quadrant; every class needs at least two images.
    """
    index = _class_index(classes)
    count = checks.whole(count, "the number of mosaics", 1)
    distinct_images = checks.flag(distinct_images, "distinct_images")
    if len(index) < 2:
        raise ValueError(f"Focus mosaics need images of at least 2 distinct classes, got {len(index)}: add images")
    if distinct_images:
        single = [c for c, own in index.items() if len(own) < 2]
        if single:
            raise ValueError(
                f"distinct_images=True needs two images of every class; class {single[0]} has one: "
                "add images or use distinct_images=False"
            )
    rng = np.random.default_rng(checks.whole(seed, "seed"))
    labels = np.asarray(sorted(index), dtype=np.int64)
    targets, quadrants, sources = [], [], []
    for _ in range(count):
        target = int(rng.choice(labels))
        distractors = [int(d) for d in rng.choice(labels[labels != target], size=2, replace=True)]
        if distinct_images:
            own = [int(i) for i in rng.choice(index[target], size=2, replace=False)]
        else:
            own = [int(rng.choice(index[target]))] * 2
        fill = [int(rng.choice(index[d])) for d in distractors]
        where = np.zeros(4, bool)
        where[rng.choice(4, size=2, replace=False)] = True
        order = np.empty(4, np.int64)
        order[where] = own
        order[~where] = fill
        targets.append(target)
        quadrants.append(where)
        sources.append(order)
    return MosaicPlan(np.asarray(targets, np.int64), np.stack(quadrants), np.stack(sources))


@functools.partial(jax.jit, static_argnames=("size",))
def resize_tiles(images: jax.Array, size: int) -> jax.Array:
    """Images ``(M, H, W, 3)`` resized to ``(M, size, size, 3)``: bilinear, antialiased.

    ``jax.image.resize(..., "linear", antialias=True)``: a triangle filter widened by the scale
    when shrinking, weights renormalised at the borders. This is what torchvision's
    ``resize(..., antialias=True)`` on a tensor and ``F.interpolate(mode="bilinear",
    align_corners=False, antialias=True)`` compute (equal to 1.2e-7 in the tests).
    """
    return jax.image.resize(images, (images.shape[0], size, size, images.shape[-1]), "linear", antialias=True)


def build_mosaics(images, plan: MosaicPlan, tile: int = PAPER_TILE) -> Mosaics:
    """The mosaics ``(M, 2 tile, 2 tile, 3)`` of a ``plan``: each quadrant its source image of
    ``images`` (an array ``(K, H, W, 3)`` in [-1, 1], or any sequence of such ``(H, W, 3)``
    images indexed like the plan's ``sources``) resized by :func:`resize_tiles`."""
    tile = checks.whole(tile, "tile", 1)
    needed = np.unique(plan.sources)
    picked = np.stack([np.asarray(images[int(i)], np.float32) for i in needed])
    x = checks.images(picked)
    if min(x.shape[1:3]) < 2:
        raise ValueError(f"mosaic source images must be at least 2x2 pixels, got {x.shape[1]}x{x.shape[2]}")
    tiles = np.asarray(resize_tiles(x, tile))
    where = np.searchsorted(needed, plan.sources)  # (M, 4) rows of `tiles`
    return Mosaics(_tile_grid(tiles[where]), plan.targets, plan.quadrants, plan.sources)


def make_paper_mosaics(
    images,
    classes: Sequence[int],
    count: int,
    seed: int = PAPER_SEED,
    tile: int = PAPER_TILE,
    distinct_images: bool = False,
) -> Mosaics:
    """``count`` mosaics of the paper's Focus protocol: :func:`plan_paper_mosaics` then
    :func:`build_mosaics`. ``images`` ``(K, H, W, 3)`` (the paper's: resized to 256 and centre-cropped
    to 224), ``classes`` ``(K,)`` -> :class:`Mosaics` of ``(count, 2 tile, 2 tile, 3)``."""
    classes = np.asarray(classes)
    if classes.ndim != 1 or len(images) != classes.shape[0]:
        raise ValueError(f"need one class per image: {len(images)} images, classes of shape {classes.shape}")
    return build_mosaics(images, plan_paper_mosaics(classes, count, seed, distinct_images), tile)
