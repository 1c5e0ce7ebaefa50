"""The paper's faithfulness metrics, computed exactly as Quantus 0.6.0 computes them, in JAX.

The paper (its ``lib/evaluator.py``, ``default_metrics``) scores attribution maps with four
perturbation metrics; each function here states Quantus' definition with the paper's settings as
defaults (224-pixel images) and is tested equal to Quantus in ``tests/test_metrics_quantus.py``:

* :func:`infidelity_paper`: the paper's ``InfidelityOptimalScaling`` (112- and 56-pixel patches,
  uniform baseline in [-1, 1], 5 samples). Lower is better.
* :func:`faithfulness_correlation_paper`: the paper's ``FaithfulnessCorrelationPatches`` (56-pixel
  patches set to 0, ``abs=True``). Higher is better.
* :func:`faithfulness_estimate`: ``quantus.FaithfulnessEstimate(features_in_step=3136,
  perturb_baseline=0.0, abs=True)``. Higher is better.
* :func:`monotonicity_correlation`: ``quantus.MonotonicityCorrelation(nr_samples=10,
  features_in_step=3136, perturb_baseline="uniform", uniform in [-1, 1], abs=True, eps=1e-12)``.
  Higher is better.

What Quantus does that a reader may not expect, and these functions reproduce:

* A "uniform" baseline is ONE value per image and perturbation (``get_baseline_value`` draws
  ``uniform(low, high, size=batch)`` and broadcasts it), not noise per pixel: a perturbed patch or
  feature group becomes a constant, the same in its three channels.
* Infidelity's perturbations are cumulative: for each sample and patch size, the k-th perturbation
  replaces patches 0..k (row-major), each with its own constant, so the last one replaces the
  whole image. Infidelity needs image sizes divisible by every patch size (Quantus' loop indexes
  the unpadded image with the padded image's indices and fails otherwise).
* Faithfulness Correlation over patches pads the image and the map with their edge values when
  the size is not divisible by the patch (``floor`` of half the padding before, ``ceil`` after):
  the perturbation covers the image pixels of a padded block, the attribution sum counts the
  replicated edge values of the padded map too.
* Features are ranked on the map flattened channel-first ``(3, H, W)``; ties (exact zeros, for
  instance) are ranked by that index, as ``numpy.argsort(..., kind="stable")``. Quantus calls
  numpy's default sort, which leaves the order of ties unspecified: with tied values the two can
  perturb different features.
* Quantus first divides every map by the largest ``|a|`` of the batch (``normalise=True``); the
  correlations are invariant to that, so it is not done here.

Randomness: the uniform values come from ``key``, or explicitly as ``values`` (the tests pass the
values Quantus draws from numpy's global generator, to compare score by score). Every image is
processed by ``lax.map``; its perturbed copies run through the model as one batch, or in batches
of ``batch_size`` copies when given (for memory: monotonicity has 480 copies per 224-pixel image).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxpull.core import checks
from jaxpull.core.model import Model
from jaxpull.evaluation.metrics import _checked, finite_setting, pearson, spearman

# The paper's settings (lib/evaluator.py, default_metrics), for 224x224 images.
INFIDELITY_PATCHES = (112, 56)
INFIDELITY_SAMPLES = 5
CORRELATION_PATCHES = (56,)
FEATURES_IN_STEP = 3136  # 224 * 224 / 16
MONOTONICITY_SAMPLES = 10


# --------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------


def _scores(model: Model, target: jax.Array, softmax: bool, make: Callable, n: int, batch_size: int | None):
    """The target's logit (softmax probability with ``softmax``) of the images ``make(i)`` for
    ``i < n``, ``(n,)``: one batch, or ``lax.map`` over batches of ``batch_size``."""

    def one(i):
        out = model.apply(make(i)[None])[0]
        return (jax.nn.softmax(out) if softmax else out)[target]

    idx = jnp.arange(n)
    return jax.vmap(one)(idx) if batch_size is None or batch_size >= n else lax.map(one, idx, batch_size=batch_size)


def _clean_score(model: Model, xi: jax.Array, target: jax.Array, softmax: bool = False) -> jax.Array:
    out = model.apply(xi[None])[0]
    return (jax.nn.softmax(out) if softmax else out)[target]


def _padding(size: int, patch: int) -> tuple[int, int]:
    """Quantus' ``get_padding_size``: the edge padding that makes ``size`` a multiple of ``patch``."""
    extra = (-size) % patch
    return extra // 2, extra - extra // 2


def _block_ids(height: int, width: int, patch: int) -> np.ndarray:
    """``(H, W)`` row-major index of each pixel's block in the edge-padded grid of ``patch`` blocks."""
    top, left = _padding(height, patch)[0], _padding(width, patch)[0]
    blocks_w = (width + sum(_padding(width, patch))) // patch
    rows = (np.arange(height) + top) // patch
    cols = (np.arange(width) + left) // patch
    return (rows[:, None] * blocks_w + cols[None, :]).astype(np.int32)


def _block_count(height: int, width: int, patch: int) -> int:
    return math.ceil(height / patch) * math.ceil(width / patch)


def _batch(batch_size) -> int | None:
    return None if batch_size is None else checks.whole(batch_size, "batch_size", 1)


def _patch_sizes(patch_sizes, name: str) -> tuple[int, ...]:
    sizes = (patch_sizes,) if isinstance(patch_sizes, (int, np.integer)) else tuple(patch_sizes)
    if not sizes:
        raise ValueError(f"{name} is empty: give at least one patch size, e.g. {name}=(56,)")
    return tuple(checks.whole(p, name, 1) for p in sizes)


def _uniform_bounds(low, high) -> tuple[float, float]:
    low, high = finite_setting(low, "low", positive=False), finite_setting(high, "high", positive=False)
    if low > high:
        raise ValueError(f"the uniform baseline needs low <= high, got low={low!r}, high={high!r}")
    return low, high


def _values(values, key, shape: tuple[int, ...], axes: str, low: float, high: float, name: str) -> jax.Array:
    """Explicit uniform baseline values of ``shape`` (checked; ``axes`` names its axes), or drawn from ``key``."""
    if values is None:
        if key is None:
            raise ValueError(f"{name} draws random baseline values: pass key=jax.random.key(seed) (or values=...)")
        return jax.random.uniform(key, shape, jnp.float32, low, high)
    if tuple(np.shape(values)) != shape:
        raise ValueError(f"values must have shape {shape} ({axes}), got {tuple(np.shape(values))}")
    checks.finite(jnp.asarray(values), "values")
    return jnp.asarray(values, jnp.float32)


def _feature_groups(height: int, width: int, features_in_step: int, name: str) -> int:
    """The number of groups of ``features_in_step`` among the 3 H W features (checked as Quantus does)."""
    k = checks.whole(features_in_step, "features_in_step", 1)
    if (height * width) % k:
        raise ValueError(
            f"{name}: features_in_step={k} must divide H * W = {height * width} (Quantus asserts it): "
            "use a divisor of H * W"
        )
    return 3 * height * width // k  # at least 3: k divides H * W


def _ranked(a: jax.Array, use_abs: bool, descending: bool) -> tuple[jax.Array, jax.Array]:
    """One map ``(H, W, 3)``: its values flattened channel-first and the stable order that sorts
    them (ties by channel-first index): ``(3 H W,)``, ``(3 H W,)``."""
    flat = jnp.transpose(a, (2, 0, 1)).reshape(-1)
    if use_abs:
        flat = jnp.abs(flat)
    return flat, jnp.argsort(-flat if descending else flat, stable=True)


def _group_map(order: jax.Array, k: int, shape: tuple[int, int, int]) -> jax.Array:
    """``(H, W, 3)`` index of each feature's group: the position of the feature in ``order``, // k."""
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    h, w, c = shape
    return jnp.transpose((rank // k).reshape(c, h, w), (1, 2, 0))


# --------------------------------------------------------------------------------------
# Infidelity (the paper's optimal-scaling variant)
# --------------------------------------------------------------------------------------


def infidelity_paper(
    model: Model,
    x: jax.Array,
    targets: jax.Array,
    attributions: jax.Array,
    key: jax.Array | None = None,
    patch_sizes: Sequence[int] = INFIDELITY_PATCHES,
    samples: int = INFIDELITY_SAMPLES,
    low: float = -1.0,
    high: float = 1.0,
    values: jax.Array | None = None,
    batch_size: int | None = None,
) -> jax.Array:
    """The paper's Infidelity with optimal scaling (inputs checked; see :func:`infidelity_paper_core`).

    ``values`` ``(N, samples, B)``, B the total number of patches over ``patch_sizes``: the
    uniform values of the patches, in Quantus' order of draws (sample, patch size, row-major
    patch); default: uniform in [``low``, ``high``] from ``key``.
    """
    x, targets, attributions = _checked(model, x, targets, attributions)
    sizes = _patch_sizes(patch_sizes, "patch_sizes")
    h, w = x.shape[1:3]
    for p in sizes:
        if h % p or w % p:
            raise ValueError(
                f"infidelity_paper: a {h}x{w} image does not split into {p}-pixel patches (Quantus fails on it "
                "too): use patch_sizes that divide the image size"
            )
    samples = checks.whole(samples, "samples", 1)
    low, high = _uniform_bounds(low, high)
    blocks = sum(_block_count(h, w, p) for p in sizes)
    values = _values(
        values, key, (x.shape[0], samples, blocks), "images, samples, patches", low, high, "infidelity_paper"
    )
    return infidelity_paper_core(model, x, targets, attributions, values, sizes, _batch(batch_size))


@functools.partial(jax.jit, static_argnames=("patch_sizes", "batch_size"))
def infidelity_paper_core(
    model: Model,
    x: jax.Array,
    targets: jax.Array,
    attributions: jax.Array,
    values: jax.Array,
    patch_sizes: tuple[int, ...] = INFIDELITY_PATCHES,
    batch_size: int | None = None,
) -> jax.Array:
    """``min_beta mean_I (beta <a, I> - (f(x) - f(x - I)))^2`` over the paper's patch perturbations.

    f is the target logit. For each sample s and patch size p (the image split row-major into
    patches 0..B_p - 1), perturbation k replaces patches 0..k, patch j by the constant
    ``values[s, j]`` in all three channels (cumulative: B_p perturbations, the last covering the
    image), and I = x - x_perturbed. beta = sum <a, I> (f(x) - f(x - I)) / sum <a, I>^2 over all
    ``samples * sum_p B_p`` perturbations (0 when every <a, I> is 0, Captum's ``safe_div``), which
    equals the paper's ``beta**2 * agg_a2 - 2 * beta * agg_ab + agg_b2`` divided by their number.

    ``(N, H, W, 3)``, ``(N,)``, ``(N, H, W, 3)``, ``values`` ``(N, samples, B)`` -> ``(N,)``.
    """
    h, w = x.shape[1:3]
    ids = np.stack([_block_ids(h, w, p) for p in patch_sizes])  # (P, H, W)
    counts = [_block_count(h, w, p) for p in patch_sizes]
    offsets = np.cumsum([0] + counts[:-1])
    samples = values.shape[1]
    # perturbation t -> (patch size, sample, k), patch size major
    size_of = np.concatenate([np.full(samples * c, i) for i, c in enumerate(counts)])
    sample_of = np.concatenate([np.repeat(np.arange(samples), c) for c in counts])
    k_of = np.concatenate([np.tile(np.arange(c), samples) for c in counts])
    size_of, sample_of, k_of = (jnp.asarray(v, jnp.int32) for v in (size_of, sample_of, k_of))
    ids, offsets = jnp.asarray(ids), jnp.asarray(offsets, jnp.int32)

    def one(args):
        xi, t, a, v = args

        def perturbed(i):
            block = ids[size_of[i]]
            u = v[sample_of[i], offsets[size_of[i]] + block]  # (H, W): each patch's constant
            return jnp.where((block <= k_of[i])[..., None], u[..., None], xi)

        def score_and_dot(i):
            xp = perturbed(i)
            out = model.apply(xp[None])[0, t]
            return out, jnp.sum(a * (xi - xp))

        idx = jnp.arange(size_of.shape[0])
        if batch_size is None or batch_size >= idx.shape[0]:
            f, e = jax.vmap(score_and_dot)(idx)
        else:
            f, e = lax.map(score_and_dot, idx, batch_size=batch_size)
        drop = _clean_score(model, xi, t) - f
        den = jnp.sum(e * e)
        beta = jnp.sum(e * drop) / jnp.where(den != 0, den, 1.0)
        return jnp.mean((beta * e - drop) ** 2)

    return lax.map(one, (x, targets, attributions, values))


# --------------------------------------------------------------------------------------
# Faithfulness correlation over patches
# --------------------------------------------------------------------------------------


def faithfulness_correlation_paper(
    model: Model,
    x: jax.Array,
    targets: jax.Array,
    attributions: jax.Array,
    patch_sizes: Sequence[int] = CORRELATION_PATCHES,
    baseline: float = 0.0,
    abs: bool = True,
    batch_size: int | None = None,
) -> jax.Array:
    """The paper's Faithfulness Correlation over patches (inputs checked; see
    :func:`faithfulness_correlation_paper_core`)."""
    x, targets, attributions = _checked(model, x, targets, attributions)
    sizes = _patch_sizes(patch_sizes, "patch_sizes")
    h, w = x.shape[1:3]
    if sum(_block_count(h, w, p) for p in sizes) < 2:
        raise ValueError(
            f"faithfulness_correlation_paper: a {h}x{w} image has a single patch of {sizes[0]} pixels, too few "
            "for a correlation: use smaller patch_sizes"
        )
    baseline = finite_setting(baseline, "baseline", positive=False)
    abs = checks.flag(abs, "abs")
    return faithfulness_correlation_paper_core(
        model, x, targets, attributions, baseline, sizes, abs, _batch(batch_size)
    )


@functools.partial(jax.jit, static_argnames=("patch_sizes", "abs", "batch_size"))
def faithfulness_correlation_paper_core(
    model: Model,
    x: jax.Array,
    targets: jax.Array,
    attributions: jax.Array,
    baseline: float = 0.0,
    patch_sizes: tuple[int, ...] = CORRELATION_PATCHES,
    abs: bool = True,
    batch_size: int | None = None,
) -> jax.Array:
    """Pearson correlation, over every patch of every size in ``patch_sizes``, of the attribution
    summed in the patch (``|a|`` with ``abs``) and the target logit's drop when the patch is set
    to ``baseline``.

    Sizes not divisible by a patch size are edge-padded (Quantus' ``get_padding_size``: half the
    padding, rounded down, before; the rest after): a patch of the padded grid perturbs the image
    pixels it covers, and its sum counts the padded map's replicated edge values too.
    ``(N, H, W, 3)``, ``(N,)``, ``(N, H, W, 3)`` -> ``(N,)``; NaN where either side is constant.
    """
    h, w = x.shape[1:3]
    ids = [_block_ids(h, w, p) for p in patch_sizes]
    counts = [_block_count(h, w, p) for p in patch_sizes]
    size_of = jnp.asarray(np.concatenate([np.full(c, i) for i, c in enumerate(counts)]), jnp.int32)
    block_of = jnp.asarray(np.concatenate([np.arange(c) for c in counts]), jnp.int32)
    id_stack = jnp.asarray(np.stack(ids))

    def one(args):
        xi, t, a = args
        a = jnp.abs(a) if abs else a
        sums = []
        for p in patch_sizes:
            (top, bottom), (left, right) = _padding(h, p), _padding(w, p)
            padded = jnp.pad(a, ((top, bottom), (left, right), (0, 0)), mode="edge")
            hp, wp = padded.shape[:2]
            sums.append(padded.reshape(hp // p, p, wp // p, p, 3).sum(axis=(1, 3, 4)).reshape(-1))
        perturbed = lambda i: jnp.where((id_stack[size_of[i]] == block_of[i])[..., None], baseline, xi)
        drop = _clean_score(model, xi, t) - _scores(model, t, False, perturbed, size_of.shape[0], batch_size)
        return pearson(jnp.concatenate(sums), drop)

    return lax.map(one, (x, targets, attributions))


# --------------------------------------------------------------------------------------
# Faithfulness estimate and monotonicity correlation (feature groups by rank)
# --------------------------------------------------------------------------------------


def faithfulness_estimate(
    model: Model,
    x: jax.Array,
    targets: jax.Array,
    attributions: jax.Array,
    features_in_step: int = FEATURES_IN_STEP,
    baseline: float = 0.0,
    abs: bool = True,
    batch_size: int | None = None,
) -> jax.Array:
    """Faithfulness Estimate (Alvarez-Melis and Jaakkola 2018) as Quantus computes it (inputs
    checked; see :func:`faithfulness_estimate_core`). ``features_in_step`` must divide H * W."""
    x, targets, attributions = _checked(model, x, targets, attributions)
    _feature_groups(x.shape[1], x.shape[2], features_in_step, "faithfulness_estimate")
    baseline = finite_setting(baseline, "baseline", positive=False)
    abs = checks.flag(abs, "abs")
    return faithfulness_estimate_core(
        model, x, targets, attributions, baseline, int(features_in_step), abs, _batch(batch_size)
    )


@functools.partial(jax.jit, static_argnames=("features_in_step", "abs", "batch_size"))
def faithfulness_estimate_core(
    model: Model,
    x: jax.Array,
    targets: jax.Array,
    attributions: jax.Array,
    baseline: float = 0.0,
    features_in_step: int = FEATURES_IN_STEP,
    abs: bool = True,
    batch_size: int | None = None,
) -> jax.Array:
    """Pearson correlation, over G = 3 H W / ``features_in_step`` groups, of the attribution sum of
    a group and the target logit's drop when the group is set to ``baseline``.

    The features (pixel channels, flattened channel-first) are sorted by decreasing attribution
    (``|a|`` with ``abs``; ties by index); group g holds ranks [g k, (g + 1) k). Each perturbation
    sets one group, the rest of the image stays clean. ``(N, H, W, 3)``, ``(N,)``, ``(N, H, W, 3)``
    -> ``(N,)``; NaN where either side is constant.
    """
    k = features_in_step
    groups = x.shape[1] * x.shape[2] * 3 // k

    def one(args):
        xi, t, a = args
        flat, order = _ranked(a, abs, descending=True)
        group = _group_map(order, k, xi.shape)
        att = flat[order].reshape(groups, k).sum(-1)
        perturbed = lambda g: jnp.where(group == g, baseline, xi)
        drop = _clean_score(model, xi, t) - _scores(model, t, False, perturbed, groups, batch_size)
        return pearson(att, drop)

    return lax.map(one, (x, targets, attributions))


def monotonicity_correlation(
    model: Model,
    x: jax.Array,
    targets: jax.Array,
    attributions: jax.Array,
    key: jax.Array | None = None,
    features_in_step: int = FEATURES_IN_STEP,
    samples: int = MONOTONICITY_SAMPLES,
    baseline: str | float = "uniform",
    low: float = -1.0,
    high: float = 1.0,
    values: jax.Array | None = None,
    abs: bool = True,
    eps: float = 1e-12,
    softmax: bool = True,
    batch_size: int | None = 96,
) -> jax.Array:
    """Monotonicity Correlation (Nguyen and Martinez 2020) as Quantus computes it (inputs checked;
    see :func:`monotonicity_correlation_core`).

    ``baseline="uniform"``: each of the ``samples`` perturbations of a group sets it to one value
    uniform in [``low``, ``high``], from ``key`` or given as ``values`` ``(N, G, samples)`` (Quantus'
    order of draws: group, then sample). A number: every perturbation sets the group to it (the
    ``samples`` identical perturbations are run once). ``features_in_step`` must divide H * W.
    """
    x, targets, attributions = _checked(model, x, targets, attributions)
    groups = _feature_groups(x.shape[1], x.shape[2], features_in_step, "monotonicity_correlation")
    samples = checks.whole(samples, "samples", 1)
    abs, softmax = checks.flag(abs, "abs"), checks.flag(softmax, "softmax")
    eps = finite_setting(eps, "eps", positive=False)
    if isinstance(baseline, str):
        checks.choice(baseline, ("uniform",), "baseline")
        low, high = _uniform_bounds(low, high)
        values = _values(
            values, key, (x.shape[0], groups, samples), "images, groups, samples", low, high, "monotonicity_correlation"
        )
    else:
        if values is not None:
            raise ValueError("values are the draws of baseline='uniform': drop values or set baseline='uniform'")
        baseline = finite_setting(baseline, "baseline", positive=False)
        values = jnp.full((x.shape[0], groups, 1), baseline, jnp.float32)
    return monotonicity_correlation_core(
        model, x, targets, attributions, values, eps, int(features_in_step), abs, softmax, _batch(batch_size)
    )


@functools.partial(jax.jit, static_argnames=("features_in_step", "abs", "softmax", "batch_size"))
def monotonicity_correlation_core(
    model: Model,
    x: jax.Array,
    targets: jax.Array,
    attributions: jax.Array,
    values: jax.Array,
    eps: float = 1e-12,
    features_in_step: int = FEATURES_IN_STEP,
    abs: bool = True,
    softmax: bool = True,
    batch_size: int | None = 96,
) -> jax.Array:
    """Spearman correlation, over G = 3 H W / ``features_in_step`` groups, of the attribution sum
    of a group and the variance its perturbation causes.

    The features (flattened channel-first) are sorted by increasing attribution (``|a|`` with
    ``abs``; ties by index); group g holds ranks [g k, (g + 1) k). Perturbation j of group g sets
    the group to ``values[g, j]`` (the rest stays clean); with p the target's softmax probability
    (its logit without ``softmax``), the variance is ``mean_j (p(x_gj) - p(x))^2 / p(x)^2``
    (the factor is 1 where ``|p(x)| < eps``). ``values`` ``(N, G, S)`` -> ``(N,)``; NaN where
    either side is constant.
    """
    k = features_in_step
    groups = x.shape[1] * x.shape[2] * 3 // k
    samples = values.shape[-1]

    def one(args):
        xi, t, a, v = args
        flat, order = _ranked(a, abs, descending=False)
        group = _group_map(order, k, xi.shape)
        att = flat[order].reshape(groups, k).sum(-1)
        perturbed = lambda i: jnp.where(group == i // samples, v[i // samples, i % samples], xi)
        p0 = _clean_score(model, xi, t, softmax)
        p = _scores(model, t, softmax, perturbed, groups * samples, batch_size).reshape(groups, samples)
        inv = jnp.where(jnp.abs(p0) >= eps, 1.0 / jnp.abs(p0), 1.0) ** 2
        return spearman(att[None], (jnp.mean((p - p0) ** 2, axis=1) * inv)[None])[0]

    return lax.map(one, (x, targets, attributions, values))
