"""Faithfulness and sanity metrics of attribution maps, in JAX.

Each metric scores one map per image: ``attributions`` ``(N, H, W, 3)`` for ``targets`` ``(N,)``
(one target per image). Definitions (and the choices the literature leaves open) are stated
in each docstring; the numeric parts are jitted and batched over images.

* :func:`focus` on 2x2 mosaics (:mod:`jaxpull.evaluation.mosaics`), Arias-Duart et al. 2022:
  higher is better. By default equal to ``quantus.Focus(abs=False, normalise=False)`` on
  ``x * attribution``; ``variant="channel_sum"`` is jaxpull's earlier variant.
* :func:`faithfulness_correlation` over a grid of patches, Bhatt et al. 2020: higher is better.
* :func:`infidelity` with optimal scaling, Yeh et al. 2019: lower is better.
* :func:`max_sensitivity`, Yeh et al. 2019: lower is better (:func:`max_sensitivity_paper`: the
  paper's ``quantus.MaxSensitivity(nr_samples=10, lower_bound=0.02)``).
* :func:`random_logit` (SSIM to the map of a random other class), Sixt et al. 2020: lower is
  better (:func:`random_logit_paper`: the paper's ``quantus.RandomLogit`` with Pearson correlation).
* :func:`model_randomization`, Adebayo et al. 2018 (cascading, top-down): lower is better.

The paper's perturbation metrics (its Infidelity and Faithfulness Correlation over patches,
Faithfulness Estimate, Monotonicity Correlation) are in :mod:`jaxpull.evaluation.faithfulness`.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxpull.core import checks
from jaxpull.core.model import Model
from jaxpull.evaluation.mosaics import Mosaics, make_mosaics  # noqa: F401 (their home before mosaics.py)

# Explainer restricted to one target per image: (x (N, H, W, 3), targets (N,)) -> (N, H, W, 3).
MapFunction = Callable[[jax.Array, jax.Array], jax.Array]

_FLOAT32_MAX = float(np.finfo(np.float32).max)


def finite_setting(value, name: str, positive: bool = True) -> float:
    """A concrete number as a Python float if it is finite in float32 (and > 0 with ``positive``),
    else ValueError: the computations run in float32, where 1e300 is infinite."""
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not (np.isfinite(v) and abs(v) <= _FLOAT32_MAX) or (positive and v <= 0):
        need = "positive and finite" if positive else "finite"
        raise ValueError(f"{name} must be {need} (in float32, |{name}| < 3.4e38), got {value!r}")
    return v


# --------------------------------------------------------------------------------------
# Small statistics
# --------------------------------------------------------------------------------------


@jax.jit
def pearson(a: jax.Array, b: jax.Array) -> jax.Array:
    """Pearson correlation along the last axis: ``(..., D)``, ``(..., D)`` -> ``(...)``; NaN if one is constant."""
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    den = jnp.sqrt(jnp.sum(a * a, -1) * jnp.sum(b * b, -1))
    return jnp.where(den > 0, jnp.sum(a * b, -1) / jnp.where(den > 0, den, 1.0), jnp.nan)


def _ranks(a: jax.Array) -> jax.Array:
    # average ranks: tied values share the mean of their positions, as scipy.stats.rankdata
    order = jnp.argsort(a, axis=-1)
    s = jnp.take_along_axis(a, order, -1)
    first = jnp.searchsorted(s, s, side="left").astype(jnp.float32)
    last = jnp.searchsorted(s, s, side="right").astype(jnp.float32) - 1
    sorted_ranks = (first + last) / 2
    ranks = jnp.zeros_like(sorted_ranks).at[order].set(sorted_ranks)
    return ranks


@jax.jit
def spearman(a: jax.Array, b: jax.Array) -> jax.Array:
    """Spearman rank correlation along the last axis (ties get average ranks): ``(N, D)`` -> ``(N,)``."""
    ra = jax.vmap(_ranks)(a.reshape(-1, a.shape[-1])).reshape(a.shape)
    rb = jax.vmap(_ranks)(b.reshape(-1, b.shape[-1])).reshape(b.shape)
    return pearson(ra, rb)


@functools.partial(jax.jit, static_argnames=("window",))
def ssim(a: jax.Array, b: jax.Array, data_range: float = 1.0, window: int = 7) -> jax.Array:
    """Mean structural similarity of 2-D maps ``(N, H, W)`` -> ``(N,)``.

    As ``skimage.metrics.structural_similarity`` with its defaults: a uniform ``window`` x
    ``window`` filter, K1 = 0.01, K2 = 0.03, sample covariances, mean over the windows that lie
    inside the map.
    """

    def mean(z):
        return lax.reduce_window(z, 0.0, lax.add, (1, window, window), (1, 1, 1), "VALID") / window**2

    n = window**2
    cov = n / (n - 1)
    ma, mb = mean(a), mean(b)
    va = cov * (mean(a * a) - ma * ma)
    vb = cov * (mean(b * b) - mb * mb)
    vab = cov * (mean(a * b) - ma * mb)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ma * mb + c1) * (2 * vab + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2))
    return s.mean(axis=(1, 2))


# --------------------------------------------------------------------------------------
# Focus on mosaics
# --------------------------------------------------------------------------------------


FOCUS_VARIANTS = ("quantus", "channel_sum")


def focus(
    attributions: jax.Array, x: jax.Array, quadrants: jax.Array, variant: str = "quantus", undefined: float = np.nan
) -> jax.Array:
    """Focus of ``attributions`` on the mosaics ``x`` (checked; see :func:`focus_core`).

    ``undefined``: the score of a mosaic without positive relevance (NaN; Quantus gives 0 there,
    as its denominator has a 1e-9 added: pass ``undefined=0.0`` for its mean)."""
    x = checks.images(x)
    attributions = checks.attributions(attributions, x.shape)
    if tuple(np.shape(quadrants)) != (x.shape[0], 4):
        raise ValueError(f"quadrants must have shape ({x.shape[0]}, 4), got {tuple(np.shape(quadrants))}")
    if min(x.shape[1:3]) < 2:
        raise ValueError(f"Focus mosaics must be at least 2x2 pixels (four quadrants), got {x.shape[1]}x{x.shape[2]}")
    checks.choice(variant, FOCUS_VARIANTS, "Focus variant")
    if not isinstance(undefined, (int, float, np.floating)) or isinstance(undefined, bool):
        raise ValueError(f"undefined must be a number (or nan), got {undefined!r}")
    return focus_core(attributions, x, jnp.asarray(quadrants, bool), variant, undefined)


@functools.partial(jax.jit, static_argnames=("variant",))
def focus_core(
    attributions: jax.Array, x: jax.Array, quadrants: jax.Array, variant: str = "quantus", undefined: float = np.nan
) -> jax.Array:
    """Focus: share of the positive relevance that falls in the target quadrants.

    Relevance r = ``x * attribution``. ``variant="quantus"`` (the paper's, ``quantus.Focus(abs=False,
    normalise=False)`` on r with its channels): every element of r is clipped at 0, then summed
    over channels and pixels per quadrant, and the score is ``inside / (total + 1e-9)``.
    ``"channel_sum"`` (jaxpull's earlier variant): r is summed over channels first, then clipped,
    and the score is ``inside / total``. Quadrants split at ``H // 2`` and ``W // 2`` (row-major:
    top-left, top-right, bottom-left, bottom-right), as Quantus does. ``(N, H, W, 3)``,
    ``(N, H, W, 3)``, ``(N, 4)`` bool -> ``(N,)`` in [0, 1] (chance 0.5 with two target quadrants);
    ``undefined`` where no relevance is positive.
    """
    _, h, w, _ = x.shape
    r = x * attributions
    r = jnp.maximum(r.sum(-1), 0.0) if variant == "channel_sum" else jnp.maximum(r, 0.0).sum(-1)
    hh, hw = h // 2, w // 2
    parts = (r[:, :hh, :hw], r[:, :hh, hw:], r[:, hh:, :hw], r[:, hh:, hw:])
    per_quadrant = jnp.stack([p.sum(axis=(1, 2)) for p in parts], axis=-1)
    total = per_quadrant.sum(-1)
    inside = jnp.sum(jnp.where(quadrants, per_quadrant, 0.0), -1)
    den = total if variant == "channel_sum" else total + 1e-9
    return jnp.where(total > 0, inside / jnp.where(total > 0, den, 1.0), undefined)


# --------------------------------------------------------------------------------------
# Faithfulness correlation and infidelity (need the model's logits)
# --------------------------------------------------------------------------------------


def patch_masks(height: int, width: int, grid: int) -> np.ndarray:
    """``grid * grid`` masks ``(P, H, W)`` of the non-overlapping patches of a regular grid (row-major)."""
    if height % grid or width % grid:
        raise ValueError(f"a {height}x{width} image does not split into a {grid}x{grid} grid of equal patches")
    ph, pw = height // grid, width // grid
    masks = np.zeros((grid * grid, height, width), np.float32)
    for i in range(grid):
        for j in range(grid):
            masks[i * grid + j, i * ph : (i + 1) * ph, j * pw : (j + 1) * pw] = 1
    return masks


def _target_logit(model: Model, x: jax.Array, target: jax.Array) -> jax.Array:
    return model.apply(x)[:, target]


def _num_classes(model, x: jax.Array) -> int:
    """The model's number of classes (from its logits' shape for stand-ins without ``num_classes``)."""
    n = getattr(model, "num_classes", None)
    if n is None:
        n = jax.eval_shape(lambda x: model.apply(x), x[:1]).shape[-1]
    return int(n)


def _checked(model, x, targets, attributions):
    """Validated images, one target per image (in range: JAX would clamp it) and maps."""
    x = checks.images(x)
    targets = checks.per_image_labels(targets, x.shape[0], _num_classes(model, x))
    return x, targets, checks.attributions(attributions, x.shape)


def faithfulness_correlation(
    model: Model, x: jax.Array, targets: jax.Array, attributions: jax.Array, grid: int = 4, baseline: float = 0.0
) -> jax.Array:
    """Faithfulness correlation of ``attributions`` (inputs checked; see :func:`faithfulness_correlation_core`)."""
    x, targets, attributions = _checked(model, x, targets, attributions)
    baseline = finite_setting(baseline, "baseline", positive=False)
    return faithfulness_correlation_core(model, x, targets, attributions, checks.whole(grid, "grid", 1), baseline)


@functools.partial(jax.jit, static_argnames=("grid",))
def faithfulness_correlation_core(
    model: Model, x: jax.Array, targets: jax.Array, attributions: jax.Array, grid: int = 4, baseline: float = 0.0
) -> jax.Array:
    """Pearson correlation, over the ``grid * grid`` patches, of the attribution summed in a patch
    and the target logit's drop when that patch is set to ``baseline``.

    ``(N, H, W, 3)``, ``(N,)``, ``(N, H, W, 3)`` -> ``(N,)`` (224x224 with grid 4: 16 patches of
    56x56). Images are processed one at a time (``lax.map``), each as a batch of its P copies.
    """
    masks = jnp.asarray(patch_masks(x.shape[1], x.shape[2], grid))[..., None]  # (P, H, W, 1)

    def one(args):
        xi, t, a = args
        perturbed = xi * (1 - masks) + baseline * masks
        drop = _target_logit(model, xi[None], t)[0] - _target_logit(model, perturbed, t)
        return pearson(jnp.sum(a * masks, axis=(1, 2, 3)), drop)

    return lax.map(one, (x, targets, attributions))


def infidelity(
    model: Model,
    x: jax.Array,
    targets: jax.Array,
    attributions: jax.Array,
    key: jax.Array,
    sigma: float = 0.1,
    samples: int = 32,
) -> jax.Array:
    """Infidelity of ``attributions`` (inputs checked; see :func:`infidelity_core`)."""
    x, targets, attributions = _checked(model, x, targets, attributions)
    sigma = finite_setting(sigma, "sigma")
    return infidelity_core(model, x, targets, attributions, key, sigma, checks.whole(samples, "samples", 1))


@functools.partial(jax.jit, static_argnames=("samples",))
def infidelity_core(
    model: Model,
    x: jax.Array,
    targets: jax.Array,
    attributions: jax.Array,
    key: jax.Array,
    sigma: float = 0.1,
    samples: int = 32,
) -> jax.Array:
    """Infidelity with optimal scaling: ``min_beta E_I[(beta * I.a - (f(x) - f(x - I)))^2]``.

    I ~ N(0, sigma^2) per pixel (Yeh et al.'s noisy-baseline perturbation), ``samples`` draws per
    image, f the target logit; beta is the least-squares scale, so a map is not penalised for its
    overall magnitude. ``(N, H, W, 3)``, ``(N,)``, ``(N, H, W, 3)`` -> ``(N,)``.
    """

    def one(args):
        xi, t, a, k = args
        noise = sigma * jax.random.normal(k, (samples,) + xi.shape, xi.dtype)
        drop = _target_logit(model, xi[None], t)[0] - _target_logit(model, xi - noise, t)
        e = jnp.sum(noise * a, axis=(1, 2, 3))
        den = jnp.sum(e * e)
        beta = jnp.where(den > 0, jnp.sum(e * drop) / jnp.where(den > 0, den, 1.0), 0.0)
        return jnp.mean((beta * e - drop) ** 2)

    return lax.map(one, (x, targets, attributions, jax.random.split(key, x.shape[0])))


# --------------------------------------------------------------------------------------
# Robustness and randomisation (need the explainer)
# --------------------------------------------------------------------------------------


@jax.jit
def _relative_change(a: jax.Array, b: jax.Array) -> jax.Array:
    den = jnp.sqrt(jnp.sum(a * a, axis=(1, 2, 3)))
    num = jnp.sqrt(jnp.sum((b - a) ** 2, axis=(1, 2, 3)))
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), jnp.nan)


def max_sensitivity(
    explain: MapFunction,
    x: jax.Array,
    targets: jax.Array,
    attributions: jax.Array,
    key: jax.Array | None,
    radius: float = 0.05,
    samples: int = 10,
    noise: jax.Array | None = None,
) -> jax.Array:
    """Max-sensitivity: ``max_s ||a(x + d_s) - a(x)|| / ||a(x)||`` with d_s ~ U[-radius, radius]^D.

    ``explain`` maps ``(N, H, W, 3)``, ``(N,)`` to maps; ``attributions`` is a(x); the norms are
    Frobenius norms over the whole map, every pixel channel gets its own noise, as in
    ``quantus.MaxSensitivity`` (which draws ``uniform(-lower_bound, lower_bound)``; it does not
    normalise or take absolute values by default, and neither does this). Each of the
    ``samples`` perturbations is explained as one batch. ``noise`` ``(samples, N, H, W, 3)``:
    explicit perturbations d_s instead of drawing them from ``key``. ``(N, ...)`` -> ``(N,)``;
    NaN where a(x) is zero.
    """
    x = checks.images(x)
    attributions = checks.attributions(attributions, x.shape)
    if tuple(np.shape(targets)) != (x.shape[0],):
        raise ValueError(
            f"targets must have shape ({x.shape[0]},), one class index per image, got {tuple(np.shape(targets))}"
        )
    if noise is None:
        radius = finite_setting(radius, "radius")
        samples = checks.whole(samples, "samples", 1)
        if key is None:
            raise ValueError("max_sensitivity draws random perturbations: pass key=jax.random.key(seed) (or noise=...)")
        draws = [jax.random.uniform(k, x.shape, x.dtype, -radius, radius) for k in jax.random.split(key, samples)]
    else:
        if np.ndim(noise) != 5 or tuple(np.shape(noise)[1:]) != tuple(x.shape) or np.shape(noise)[0] < 1:
            raise ValueError(f"noise must have shape (samples, *{tuple(x.shape)}), got {tuple(np.shape(noise))}")
        checks.finite(jnp.asarray(noise), "noise")
        draws = list(jnp.asarray(noise, jnp.float32))
    worst = jnp.zeros(x.shape[0])
    for d in draws:
        worst = jnp.maximum(worst, _relative_change(attributions, explain(x + d, targets)))
    return worst


def max_sensitivity_paper(
    explain: MapFunction,
    x: jax.Array,
    targets: jax.Array,
    attributions: jax.Array,
    key: jax.Array | None,
    noise: jax.Array | None = None,
) -> jax.Array:
    """The paper's ``quantus.MaxSensitivity(nr_samples=10, lower_bound=0.02)``:
    :func:`max_sensitivity` with 10 perturbations uniform in [-0.02, 0.02]. ``(N, ...)`` -> ``(N,)``."""
    return max_sensitivity(explain, x, targets, attributions, key, radius=0.02, samples=10, noise=noise)


@jax.jit
def _saliency(a: jax.Array) -> jax.Array:
    # |a| summed over channels, scaled to max 1 per map: (N, H, W, 3) -> (N, H, W)
    s = jnp.sum(jnp.abs(a), axis=-1)
    peak = jnp.max(s, axis=(1, 2), keepdims=True)
    return s / jnp.where(peak > 0, peak, 1.0)


def other_labels(targets: np.ndarray, num_classes: int, seed: int = 0) -> np.ndarray:
    """One random label per target, uniformly among the other ``num_classes - 1`` classes: ``(N,)``."""
    targets = np.asarray(targets)
    r = np.random.default_rng(seed).integers(0, num_classes - 1, targets.shape)
    return r + (r >= targets)


def random_logit(
    explain: MapFunction, x: jax.Array, targets: jax.Array, attributions: jax.Array, num_classes: int, seed: int = 0
) -> jax.Array:
    """Random-logit similarity: SSIM between the saliency (``|a|`` summed over channels, max-scaled)
    of the target's map and of a random other class's map. ``(N, ...)`` -> ``(N,)``."""
    num_classes = checks.whole(num_classes, "num_classes", 2)
    x = checks.images(x)
    targets = checks.per_image_labels(targets, x.shape[0], num_classes)
    attributions = checks.attributions(attributions, x.shape)
    others = jnp.asarray(other_labels(np.asarray(targets), num_classes, seed), jnp.int32)
    return ssim(_saliency(attributions), _saliency(explain(x, others)))


def quantus_other_labels(targets: np.ndarray, num_classes: int, seed: int = 42, batch_size: int = 64) -> np.ndarray:
    """The other labels ``quantus.RandomLogit(num_classes, seed)`` draws for ``targets`` ``(N,)``: ``(N,)``.

    Quantus reseeds numpy's global generator with ``seed`` for every batch it evaluates and draws
    ``randint(0, num_classes - 1, len(batch))``: offset r becomes the r-th class other than the
    target (``r + (r >= target)``). Its batches are ``batch_size`` images of one metric call (64
    by default), so every call of a smaller batch (the paper evaluates loader batches of 10)
    starts from the same draws: pass that batch size to get the paper's labels.
    """
    targets = np.asarray(targets)
    num_classes = checks.whole(num_classes, "num_classes", 2)
    batch_size = checks.whole(batch_size, "batch_size", 1)
    r = np.concatenate(
        [
            np.random.RandomState(checks.whole(seed, "seed")).randint(
                0, num_classes - 1, min(batch_size, len(targets) - start)
            )
            for start in range(0, len(targets), batch_size)
        ]
        or [np.zeros(0, int)]
    )
    return r + (r >= targets)


def random_logit_paper(
    model: Model,
    explain: MapFunction,
    x: jax.Array,
    targets: jax.Array,
    attributions: jax.Array,
    num_classes: int | None = None,
    seed: int = 42,
    batch_size: int = 64,
) -> jax.Array:
    """The paper's ``quantus.RandomLogit(num_classes=1000, seed=42, similarity_func=correlation_pearson)``:
    the Pearson correlation between the target's map and the map of another class, over all
    pixel channels of the raw maps ``(N, H, W, 3)`` (Quantus' max-normalisation does not change
    it). The other class is Quantus' draw (:func:`quantus_other_labels` with ``seed`` and
    ``batch_size``) among the first ``num_classes`` classes (default: all of the model's; the
    paper's 1000 ImageNet classes). ``(N, ...)`` -> ``(N,)``; lower is better.
    """
    x, targets, attributions = _checked(model, x, targets, attributions)
    classes = _num_classes(model, x)
    num_classes = classes if num_classes is None else checks.whole(num_classes, "num_classes", 2)
    if num_classes < 2 or num_classes > classes:
        raise ValueError(f"num_classes must be in [2, {classes}] (the model's classes), got {num_classes}")
    targets = checks.per_image_labels(np.asarray(targets), x.shape[0], num_classes)
    others = jnp.asarray(quantus_other_labels(np.asarray(targets), num_classes, seed, batch_size), jnp.int32)
    n = x.shape[0]
    return pearson(attributions.reshape(n, -1), explain(x, others).reshape(n, -1))


def layer_order(model: Model, image_size=64) -> list[tuple[str, ...]]:
    """The paths of the modules that own parameters, in the order the forward pass calls them,
    probed (abstractly, no compute) on an image of ``image_size`` (pixels, or ``(H, W)``: a
    fixed-size model such as ViT needs its own size)."""
    order: list[tuple[str, ...]] = []
    h, w = (image_size, image_size) if np.ndim(image_size) == 0 else tuple(image_size)

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__":
            order.append(tuple(context.module.path))
        return next_fun(*args, **kwargs)

    x = jax.ShapeDtypeStruct((1, int(h), int(w), 3), jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda m, x: m.apply(x), model, x)

    def owns_params(path):
        node = model.params
        for name in path:
            if not isinstance(node, dict) or name not in node:
                return False
            node = node[name]
        return isinstance(node, dict) and any(not isinstance(v, dict) for v in node.values())

    seen, result = set(), []
    for path in order:
        if path not in seen and owns_params(path):
            seen.add(path)
            result.append(path)
    return result


def randomize_layers(model: Model, paths: Sequence[tuple[str, ...]], key: jax.Array) -> Model:
    """A copy of ``model`` whose modules at ``paths`` have re-drawn parameters: each tensor
    replaced by Gaussian noise of its own mean and standard deviation."""

    def redraw(node, path, k):
        if len(path) == 0:
            return {
                name: value if isinstance(value, dict) else _redraw(value, jax.random.fold_in(k, i))
                for i, (name, value) in enumerate(sorted(node.items()))
            }
        out = dict(node)
        out[path[0]] = redraw(node[path[0]], path[1:], k)
        return out

    params = model.params
    for path in paths:  # a layer's draw depends on its name only, so cascading steps agree
        params = redraw(params, path, jax.random.fold_in(key, zlib.crc32("/".join(path).encode())))
    return type(model)(params, model.spec)


def _redraw(value: jax.Array, key: jax.Array) -> jax.Array:
    """Gaussian noise of ``value``'s mean and standard deviation (its largest magnitude for a
    scalar), drawn as ``jax.random.normal(key, value.shape)`` would draw it.

    The noise is the first ``value.size`` draws of a power-of-two-long vector: threefry is
    counter-based, so that prefix is the same noise, and only one computation per power of two
    is compiled. Eagerly, each tensor shape compiled five (10.7 s for a resnet18's cascade)."""
    v = np.asarray(value, np.float32)
    bucket = 1 << max(v.size - 1, 0).bit_length()
    noise = np.asarray(_normal_prefix(key, bucket))[: v.size].reshape(v.shape)
    std = v.std() if v.size > 1 else np.abs(v).max()
    return jax.device_put((v.mean() + std * noise).astype(value.dtype))


@functools.partial(jax.jit, static_argnums=1)
def _normal_prefix(key: jax.Array, size: int) -> jax.Array:
    return jax.random.normal(key, (size,), jnp.float32)


def model_randomization(
    explain: Callable[[Model, jax.Array, jax.Array], jax.Array],
    model: Model,
    x: jax.Array,
    targets: jax.Array,
    attributions: jax.Array,
    key: jax.Array,
    stages: int = 6,
) -> tuple[list[str], jax.Array]:
    """Cascading model randomisation (Adebayo et al. 2018), top-down in ``stages`` cumulative steps.

    Step s re-draws the parameters of the last ``ceil(s * L / stages)`` of the model's L
    parameterised layers (the last step: all of them) and explains ``x`` again with
    ``explain(model, x, targets)``. Returns the name of the lowest layer randomised at each step
    and the Spearman rank correlation ``(stages, N)`` of the saliency (``|a|`` summed over
    channels) with the original model's. A map that reflects what the model learned loses its
    correlation as layers are randomised.
    """
    x, targets, attributions = _checked(model, x, targets, attributions)
    stages = checks.whole(stages, "stages", 1)
    layers = layer_order(model, x.shape[1:3])  # at the images' own size: ViT takes no other
    stages = max(1, min(stages, len(layers)))
    base = _saliency(attributions).reshape(x.shape[0], -1)
    names, rhos = [], []
    for s in range(1, stages + 1):
        top = layers[len(layers) - int(np.ceil(s * len(layers) / stages)) :]
        randomized = randomize_layers(model, top, key)
        maps = _saliency(explain(randomized, x, targets)).reshape(x.shape[0], -1)
        names.append("/".join(top[0]))
        rhos.append(spearman(base, maps))
    return names, jnp.stack(rhos)
