"""Gradient-based explainers of the paper's evaluation, each under any backward rules.

Every explainer here is ``explainer(model, x, targets, *, rules=..., **options) -> (N, K, H, W, 3)``:
``x`` images ``(N, H, W, 3)`` in [-1, 1], ``targets`` ``(K,)`` or ``(N, K)`` class indices, one map per
(image, target) in input units. ``rules`` is a preset's name or a :class:`jaxpull.Rules`, with flat
overrides (``temperature=0.4``) as :func:`jaxpull.pullback` takes them: every gradient below is the
gradient under those rules. The baselines of the paper are these functions under ``rules="vanilla"``
(the exact gradient); its "Pullback-X" is X under its current rules, ``"semantic"``
(``jaxpull.evaluation.explainers`` names both).

* :func:`gradient`: the gradient of each target logit (Captum's ``Saliency(abs=False)``, Quantus' "Gradient").
* :func:`smoothgrad`: the mean gradient at ``samples`` noisy copies ``x + sigma * N(0, 1)`` (Smilkov et
  al. 2017; the paper's ``smoothgrad_explainer``: 50 copies, sigma 0.15 in [-1, 1] units; Captum's
  ``NoiseTunnel(Saliency)`` with ``nt_type="smoothgrad"``).
* :func:`fusiongrad`: SmoothGrad averaged over ``parameter_samples`` copies of the model whose every
  parameter is multiplied by ``N(1, parameter_sigma^2)`` noise (Bykov et al. 2022; the paper's
  ``fusiongrad_explainer``: 10 x 10 draws, parameter sigma 0.1, input sigma 0.15).
* :func:`integrated_gradients`: Captum's ``IntegratedGradients`` as Quantus calls it: from a zero
  baseline (mid-grey in [-1, 1]), ``n_steps=10``, ``method="riemann_trapezoid"``.
* :func:`gradient_shap`: Captum's ``GradientShap`` as Quantus calls it: a zero baseline,
  ``n_samples=5``, ``stdevs=0``: ``mean_s (x_s - b) * grad(b + a_s (x_s - b))``, ``a_s ~ U(0, 1)``.

What "parameters" are for FusionGrad: every floating-point array of jaxpull's parameter tree. jaxpull
folds each eval-mode BatchNorm into the convolution before it, so a folded kernel (torch's kernel
times the BatchNorm's scale) gets one factor per element, and its bias (the BatchNorm's shift) one
per channel, where the paper's torch model multiplies the convolution's weight and the BatchNorm's
weight and bias separately (its running statistics are buffers, not parameters, and stay). On a
model without BatchNorm the two are the same draw distribution; with it, jaxpull's kernels get
noise of standard deviation sigma where torch's get about sigma * sqrt(2). The paper's torch code
draws N(1, (sigma + 1e-6)^2); jaxpull draws N(1, sigma^2).

Random draws (functions of ``key = jax.random.key(seed)``, public so that another implementation can
be given the same: :func:`gaussian_draws`, :func:`fusion_keys`, :func:`perturb_parameters`,
:func:`shap_draws`): SmoothGrad's noise is ``gaussian_draws(key, samples, x.shape, sigma)``; FusionGrad's
``i``-th model is ``perturb_parameters(model, fusion_keys(key)[0][i], parameter_sigma)`` and its input
noise ``gaussian_draws(fusion_keys(key)[1][i], ...)``; GradientShap's coefficients and noise key are
``shap_draws(seed, ...)``. The draws of one image are shared by its K targets
(one noisy copy, K gradients), and they run one after another (``lax.scan``): memory does not grow
with their number.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxpull.core import checks, pullback as method, settings
from jaxpull.core.model import Model
from jaxpull.core.rules import Rules

# The default rules of the baselines (the exact gradient) and of the paper's pullback forms.
BASELINE_RULES = "vanilla"
PULLBACK_RULES = "semantic"
MAX_SAMPLES = 100_000  # noise draws, integration steps: beyond, the call would run for days
MAX_SEED = 2**32 - 1  # jax.random.key keeps 32 bits of a seed without 64-bit mode: 2**32 is seed 0 again
MAX_SIGMA = 1e6  # beyond, float32 noise overflows in the squares of the later layers

QUADRATURES = ("riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle", "gausslegendre")


# --------------------------------------------------------------------------------------
# Checks shared by the explainers (each a one-line ValueError naming the option)
# --------------------------------------------------------------------------------------


def prepare(model: Model, x, targets, rules: Rules | str, overrides) -> tuple[jax.Array, jax.Array, Rules]:
    """Checked images ``(N, H, W, 3)``, targets ``(N, K)`` and the resolved rules (one rule set)."""
    x = checks.images(x)
    t = checks.targets(targets, x.shape[0], model.num_classes)
    rule_set = settings.resolve(rules, **overrides)
    settings.scalars(rule_set)
    return x, t, rule_set


def _number(value, name: str) -> float:
    if isinstance(value, (bool, np.bool_, str, bytes)) or value is None:
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None


def count(value, name: str, minimum: int = 1, maximum: int = MAX_SAMPLES) -> int:
    """A whole number in ``[minimum, maximum]`` as an int (NaN, inf, 2.5 and bools are errors)."""
    v = _number(value, name)
    if not (np.isfinite(v) and v == int(v) and minimum <= v <= maximum):
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {what} (at most {maximum}), got {value!r}")
    return int(v)


def spread(value, name: str) -> float:
    """A standard deviation: finite, in ``[0, MAX_SIGMA]``."""
    v = _number(value, name)
    if not (np.isfinite(v) and 0 <= v <= MAX_SIGMA):
        raise ValueError(f"{name} must be finite and >= 0 (at most {MAX_SIGMA:g}), got {value!r}")
    return v


def baseline_value(value) -> float:
    """The baseline: one finite number in [-1, 1] units (0: mid-grey), for every pixel."""
    v = _number(value, "baseline")
    if not (np.isfinite(v) and abs(v) <= 3):
        raise ValueError(f"baseline must be a finite number in [-1, 1] units (0 is mid-grey), got {value!r}")
    return v


def seed_key(seed) -> jax.Array:
    """``jax.random.key(seed)`` for a whole number ``seed`` in [0, 2**32 - 1]."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be a whole number in [0, {MAX_SEED}], got {seed!r}")
    if not 0 <= int(seed) <= MAX_SEED:
        raise ValueError(
            f"seed must be a whole number in [0, {MAX_SEED}], got {seed!r} (larger seeds repeat smaller ones)"
        )
    return jax.random.key(int(seed))


# --------------------------------------------------------------------------------------
# Draws
# --------------------------------------------------------------------------------------


def _gaussian(key: jax.Array, shape, sigma: jax.Array) -> jax.Array:
    return sigma * jax.random.normal(key, shape, jnp.float32)


def gaussian_draws(key: jax.Array, samples: int, shape, sigma) -> jax.Array:
    """The noise the noisy explainers add to their ``s``-th copy: ``(samples,) + shape``, the ``s``-th
    ``sigma * normal(split(key, samples)[s], shape)`` (SmoothGrad's key is ``jax.random.key(seed)``)."""
    return jax.vmap(lambda k: _gaussian(k, tuple(shape), jnp.float32(sigma)))(jax.random.split(key, samples))


def shap_draws(seed: int, samples: int, n: int) -> tuple[jax.Array, jax.Array]:
    """GradientShap's draws for ``seed``: the coefficients ``a`` ``(samples, N)`` and the key of its noise."""
    k_alpha, k_noise = jax.random.split(seed_key(seed))
    return jax.random.uniform(k_alpha, (count(samples, "samples"), n), jnp.float32), k_noise


def fusion_keys(key: jax.Array, parameter_samples: int) -> tuple[jax.Array, jax.Array]:
    """FusionGrad's keys ``(parameter_samples,)`` each: of the ``i``-th model's parameter noise
    (:func:`perturb_parameters`), and of its input noise (:func:`gaussian_draws`)."""
    k_params, k_inputs = jax.random.split(key)
    index = jnp.arange(parameter_samples)
    return jax.random.split(k_params, parameter_samples), jax.vmap(lambda i: jax.random.fold_in(k_inputs, i))(index)


def perturb_parameters(model: Model, key: jax.Array, sigma: jax.Array) -> Model:
    """``model`` with every floating parameter multiplied by ``N(1, sigma^2)`` noise: one draw for all
    of them, ``(P,)`` in ``jax.tree.leaves`` order (one random-number kernel, not one per leaf)."""
    leaves, tree = jax.tree.flatten(model.params)
    floating = [i for i, p in enumerate(leaves) if jnp.issubdtype(p.dtype, jnp.floating)]
    sizes = [leaves[i].size for i in floating]
    factors = 1 + _gaussian(key, (sum(sizes),), sigma)
    out = list(leaves)
    for i, start, size in zip(floating, np.cumsum([0] + sizes[:-1]), sizes, strict=True):
        p = leaves[i]
        out[i] = p * factors[start : start + size].reshape(p.shape).astype(p.dtype)
    return Model(jax.tree.unflatten(tree, out), model.spec)


# --------------------------------------------------------------------------------------
# Pure cores: (N, H, W, 3), targets (N, K) -> (N, K, H, W, 3)
# --------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("samples",))
def smoothgrad_core(
    model: Model, x: jax.Array, targets: jax.Array, rules: Rules, key: jax.Array, sigma: jax.Array, samples: int
) -> jax.Array:
    """Mean gradient (under ``rules``) over ``samples`` copies ``x + sigma * N(0, 1)`` (keys ``split(key, samples)``)."""

    def one(total, k):  # the s-th copy's noise is gaussian_draws(key, samples, x.shape, sigma)[s]
        return total + method.pullback_core(model, x + _gaussian(k, x.shape, sigma), targets, rules), None

    zero = jnp.zeros(targets.shape + x.shape[1:], jnp.float32)
    total, _ = lax.scan(one, zero, jax.random.split(key, samples))
    return total / samples


@functools.partial(jax.jit, static_argnames=("parameter_samples", "samples"))
def fusiongrad_core(
    model: Model,
    x: jax.Array,
    targets: jax.Array,
    rules: Rules,
    key: jax.Array,
    sigma: jax.Array,
    parameter_sigma: jax.Array,
    parameter_samples: int,
    samples: int,
) -> jax.Array:
    """SmoothGrad (``samples`` copies, ``sigma``) averaged over ``parameter_samples`` models whose
    parameters are multiplied by ``N(1, parameter_sigma^2)`` noise; draws as the module docstring says."""

    def one_model(total, keys):
        k_params, k_inputs = keys
        noisy = perturb_parameters(model, k_params, parameter_sigma)
        return total + smoothgrad_core(noisy, x, targets, rules, k_inputs, sigma, samples), None

    zero = jnp.zeros(targets.shape + x.shape[1:], jnp.float32)
    total, _ = lax.scan(one_model, zero, fusion_keys(key, parameter_samples))
    return total / parameter_samples


@jax.jit
def path_core(
    model: Model,
    x: jax.Array,
    targets: jax.Array,
    rules: Rules,
    alphas: jax.Array,
    weights: jax.Array,
    baseline: jax.Array,
) -> jax.Array:
    """Integrated gradients: ``(x - b) * sum_i w_i grad(b + a_i (x - b))`` for quadrature points
    ``alphas`` and weights ``weights`` ``(S,)``, baseline ``b`` (a scalar), gradients under ``rules``."""

    def one(total, point):
        a, w = point
        return total + w * method.pullback_core(model, baseline + a * (x - baseline), targets, rules), None

    zero = jnp.zeros(targets.shape + x.shape[1:], jnp.float32)
    total, _ = lax.scan(one, zero, (alphas, weights))
    return total * (x - baseline)[:, None]


@jax.jit
def gradient_shap_core(
    model: Model,
    x: jax.Array,
    targets: jax.Array,
    rules: Rules,
    alphas: jax.Array,
    key: jax.Array,
    stdev: jax.Array,
    baseline: jax.Array,
) -> jax.Array:
    """GradientShap: ``mean_s (x_s - b) * grad(b + a_s (x_s - b))`` with ``x_s = x + stdev * N(0, 1)``
    (keys ``split(key, S)``), coefficients ``alphas`` ``(S, N)`` (one per copy of each image), baseline
    ``b`` a scalar; gradients under ``rules``. Captum's order: noise first, then the scaling."""

    def one(total, draw):
        a, k = draw
        xs = x + _gaussian(k, x.shape, stdev)
        scaled = baseline + a[:, None, None, None] * (xs - baseline)
        return total + method.pullback_core(model, scaled, targets, rules) * (xs - baseline)[:, None], None

    zero = jnp.zeros(targets.shape + x.shape[1:], jnp.float32)
    total, _ = lax.scan(one, zero, (alphas, jax.random.split(key, alphas.shape[0])))
    return total / alphas.shape[0]


# --------------------------------------------------------------------------------------
# Public explainers
# --------------------------------------------------------------------------------------


def gradient(model: Model, x, targets, *, rules: Rules | str = BASELINE_RULES, **overrides) -> jax.Array:
    """The gradient of each target logit under ``rules`` (default: the exact gradient): ``(N, K, H, W, 3)``."""
    x, t, r = prepare(model, x, targets, rules, overrides)
    return method.pullback_core(model, x, t, r)


def smoothgrad(
    model: Model,
    x,
    targets,
    *,
    samples: int = 50,
    sigma: float = 0.15,
    seed: int = 0,
    rules: Rules | str = BASELINE_RULES,
    **overrides,
) -> jax.Array:
    """SmoothGrad: the mean gradient (under ``rules``) over ``samples`` copies ``x + sigma * N(0, 1)``
    (sigma in [-1, 1] units; sigma 0 gives the plain gradient): ``(N, K, H, W, 3)``."""
    x, t, r = prepare(model, x, targets, rules, overrides)
    samples = count(samples, "samples")
    sigma = spread(sigma, "sigma")
    return smoothgrad_core(model, x, t, r, seed_key(seed), jnp.float32(sigma), samples)


def fusiongrad(
    model: Model,
    x,
    targets,
    *,
    parameter_samples: int = 10,
    samples: int = 10,
    parameter_sigma: float = 0.1,
    sigma: float = 0.15,
    seed: int = 0,
    rules: Rules | str = BASELINE_RULES,
    **overrides,
) -> jax.Array:
    """FusionGrad: SmoothGrad (``samples`` copies, ``sigma``) averaged over ``parameter_samples`` models
    whose every parameter is multiplied by ``N(1, parameter_sigma^2)`` noise; gradients under ``rules``.
    The paper's setting: 10 x 10 draws, parameter sigma 0.1, input sigma 0.15. ``(N, K, H, W, 3)``."""
    x, t, r = prepare(model, x, targets, rules, overrides)
    parameter_samples = count(parameter_samples, "parameter_samples")
    samples = count(samples, "samples")
    if parameter_samples * samples > MAX_SAMPLES:
        raise ValueError(
            f"parameter_samples * samples must be at most {MAX_SAMPLES}, got {parameter_samples * samples}"
        )
    sigma = jnp.float32(spread(sigma, "sigma"))
    psigma = jnp.float32(spread(parameter_sigma, "parameter_sigma"))
    return fusiongrad_core(model, x, t, r, seed_key(seed), sigma, psigma, parameter_samples, samples)


def quadrature(steps: int, method_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Captum's integration points and weights ``(steps,)`` float32 for ``method_name``
    (``captum.attr._utils.approximation_methods``): ``riemann_trapezoid`` points ``linspace(0, 1, n)``,
    weights ``1 / n`` halved at both ends; ``left`` / ``right`` / ``middle`` Riemann sums; Gauss-Legendre."""
    checks.choice(method_name, QUADRATURES, "integration method")
    if method_name == "gausslegendre":
        steps = count(steps, "steps")
        nodes, w = np.polynomial.legendre.leggauss(steps)
        return (0.5 * (1 + nodes)).astype(np.float32), (0.5 * w).astype(np.float32)
    n = count(steps, "steps", minimum=2)  # Captum: "The number of steps has to be larger than one"
    weights = np.full(n, 1.0 / n)
    kind = method_name.split("_")[1]
    if kind == "trapezoid":
        weights[[0, -1]] /= 2
        alphas = np.linspace(0, 1, n, dtype=np.float32)
    elif kind == "left":
        alphas = np.linspace(0, 1 - 1 / n, n, dtype=np.float32)
    elif kind == "right":
        alphas = np.linspace(1 / n, 1, n, dtype=np.float32)
    else:
        alphas = np.linspace(1 / (2 * n), 1 - 1 / (2 * n), n, dtype=np.float32)
    return alphas, weights.astype(np.float32)


def integrated_gradients(
    model: Model,
    x,
    targets,
    *,
    steps: int = 10,
    method: str = "riemann_trapezoid",
    baseline: float = 0.0,
    rules: Rules | str = BASELINE_RULES,
    **overrides,
) -> jax.Array:
    """Integrated Gradients (Sundararajan et al. 2017) as Captum computes it, with Quantus' settings
    by default (``steps`` 10, ``"riemann_trapezoid"``, baseline 0 = mid-grey): ``(x - b) * sum_i w_i
    grad(b + a_i (x - b))``, the gradients under ``rules``: ``(N, K, H, W, 3)``."""
    x, t, r = prepare(model, x, targets, rules, overrides)
    alphas, weights = quadrature(steps, method)
    b = jnp.float32(baseline_value(baseline))
    return path_core(model, x, t, r, jnp.asarray(alphas), jnp.asarray(weights), b)


def gradient_shap(
    model: Model,
    x,
    targets,
    *,
    samples: int = 5,
    stdevs: float = 0.0,
    baseline: float = 0.0,
    seed: int = 0,
    rules: Rules | str = BASELINE_RULES,
    **overrides,
) -> jax.Array:
    """GradientShap as Captum computes it, with the settings Quantus passes by default (``samples`` 5,
    ``stdevs`` 0, one baseline 0 = mid-grey): ``mean_s (x_s - b) * grad(b + a_s (x_s - b))``,
    ``a_s ~ U(0, 1)`` per copy of each image, ``x_s = x + stdevs * N(0, 1)``; gradients under ``rules``:
    ``(N, K, H, W, 3)``."""
    x, t, r = prepare(model, x, targets, rules, overrides)
    alphas, k_noise = shap_draws(seed, samples, x.shape[0])
    stdev = jnp.float32(spread(stdevs, "stdevs"))
    return gradient_shap_core(model, x, t, r, alphas, k_noise, stdev, jnp.float32(baseline_value(baseline)))
