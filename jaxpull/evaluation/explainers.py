"""Explainers behind one signature, so that metrics can compare them on the same footing.

Every explainer is ``explainer(model, x, targets, **options) -> (N, K, H, W, 3)``: ``x`` images
``(N, H, W, 3)`` in [-1, 1], ``targets`` ``(K,)`` or ``(N, K)`` class indices, one attribution
map per (image, target), in input units. ``EXPLAINERS`` maps each name to its function:

=====================  ================================================================
``pullback``           excitation pullback (the method; ``rules="excitation"`` by default)
``pullback_ascent``    x_K - x0 of the paper's PGA along pullbacks (the preset's ascent)
``gradient``           vanilla gradient of the target logit
``gradient_ascent``    x_K - x0 of the same PGA along vanilla gradients
``gradient_x_input``   gradient * x
``smoothgrad``         mean gradient over n = 50 noisy copies, sigma = 0.15 (Smilkov et al.)
``integrated_gradients``  path integral of the gradient from a zero baseline (Sundararajan et al.)
``guided_backprop``    Guided Backprop's ReLU rule (Springenberg et al.), via the gate machinery
``smoothgrad_pullback``  SmoothGrad of excitation pullbacks
=====================  ================================================================

and the explainers of the paper's current code (lib/evaluator.py), by their names there, with
the ``"semantic"`` rules by default (any gate or ascent keyword beats the preset):

==========================  ===========================================================
``SoftPullback``            one gated gradient, no normalisation (``jaxpull.pullback``)
``PullbackAscent``          x_K - x0 of the figure's ascent (5 steps, alpha 20, eps None)
                            with **no clamping at all** (unlike ``pullback_ascent``)
``PullbackAscentClipLast``  the same, clamped to [-1, 1] after the last step only
``SmoothPullback``          SmoothGrad over pullbacks, n = 50, sigma = 0.15
==========================  ===========================================================

The noise of the SmoothGrad variants is drawn from ``seed``, so a call is reproducible.
"""

from __future__ import annotations

import functools
from typing import Callable, Dict

import jax
import jax.numpy as jnp
from jax import lax

from jaxpull.core import checks, settings
from jaxpull.core import pullback as method
from jaxpull.core.model import Model
from jaxpull.core.rules import Rules
from jaxpull.core.settings import VANILLA

Explainer = Callable[..., jax.Array]


@functools.partial(jax.jit, static_argnames=("samples",))
def noise_average_core(
    model: Model, x: jax.Array, targets: jax.Array, rules: Rules, key: jax.Array, sigma: jax.Array, samples: int
) -> jax.Array:
    """Mean pullback (or gradient) over ``samples`` copies of ``x`` with N(0, sigma^2) noise.

    ``(N, H, W, 3)``, ``(N, K)`` -> ``(N, K, H, W, 3)``. The samples run one after another
    (``lax.scan``), so memory does not grow with their number.
    """

    def one(total, k):
        noisy = x + sigma * jax.random.normal(k, x.shape, x.dtype)
        return total + method.pullback_core(model, noisy, targets, rules), None

    zero = jnp.zeros(targets.shape + x.shape[1:], x.dtype)
    total, _ = lax.scan(one, zero, jax.random.split(key, samples))
    return total / samples


@functools.partial(jax.jit, static_argnames=("steps",))
def integrated_gradients_core(model: Model, x: jax.Array, targets: jax.Array, steps: int) -> jax.Array:
    """Integrated Gradients from the zero baseline, midpoint rule with ``steps`` points.

    ``x * mean_{i} grad(x * (i + 1/2) / steps)``: ``(N, H, W, 3)``, ``(N, K)`` -> ``(N, K, H, W, 3)``.
    """

    def one(total, a):
        return total + method.pullback_core(model, a * x, targets, VANILLA), None

    alphas = (jnp.arange(steps, dtype=x.dtype) + 0.5) / steps
    zero = jnp.zeros(targets.shape + x.shape[1:], x.dtype)
    total, _ = lax.scan(one, zero, alphas)
    return x[:, None] * total / steps


def _checked(model: Model, x, targets):
    x = checks.images(x)
    return x, checks.targets(targets, x.shape[0], model.num_classes)


def pullback(model: Model, x, targets, **rules) -> jax.Array:
    """Excitation pullbacks (``jaxpull.pullback``; ``rules``: the preset and overrides): ``(N, K, H, W, 3)``."""
    return method.pullback(model, x, targets, **rules)


def gradient(model: Model, x, targets) -> jax.Array:
    """Vanilla gradient of each target logit: ``(N, K, H, W, 3)``."""
    return method.pullback(model, x, targets, rules="vanilla")


def pullback_ascent(model: Model, x, targets, **options) -> jax.Array:
    """x_K - x0 of the paper's PGA along pullbacks (``jaxpull.ascent``'s options): ``(N, K, H, W, 3)``."""
    return method.ascent(model, x, targets, output="diff", **options)


def gradient_ascent(model: Model, x, targets, *, rules: str = settings.DEFAULT_RULES, **options) -> jax.Array:
    """x_K - x0 of the same PGA along vanilla gradients, with the ascent settings of the preset ``rules``
    (``options``: ascent overrides): ``(N, K, H, W, 3)``."""
    return method.ascent(model, x, targets, rules="vanilla", ascent=rules, output="diff", **options)


def gradient_x_input(model: Model, x, targets) -> jax.Array:
    """Gradient times input: ``(N, K, H, W, 3)``."""
    x, t = _checked(model, x, targets)
    return method.pullback_core(model, x, t, VANILLA) * x[:, None]


def _smooth(model: Model, x, targets, rules: Rules, samples: int, sigma: float, seed: int) -> jax.Array:
    x, t = _checked(model, x, targets)
    samples = checks.count(samples, "samples")
    sigma = checks.non_negative(sigma, "sigma")  # sigma 0: the plain mean of identical maps
    key = jax.random.key(seed)
    return noise_average_core(model, x, t, rules, key, jnp.asarray(sigma, jnp.float32), samples)


def smoothgrad(model: Model, x, targets, *, samples: int = 50, sigma: float = 0.15, seed: int = 0) -> jax.Array:
    """SmoothGrad: mean gradient over ``samples`` noisy copies (sigma in [-1, 1] units): ``(N, K, H, W, 3)``."""
    return _smooth(model, x, targets, VANILLA, samples, sigma, seed)


def smoothgrad_pullback(
    model: Model,
    x,
    targets,
    *,
    samples: int = 50,
    sigma: float = 0.15,
    seed: int = 0,
    rules=settings.DEFAULT_RULES,
    **overrides,
) -> jax.Array:
    """SmoothGrad of excitation pullbacks (``rules`` and overrides as ``jaxpull.pullback``): ``(N, K, H, W, 3)``."""
    return _smooth(model, x, targets, settings.resolve(rules, **overrides), samples, sigma, seed)


def integrated_gradients(model: Model, x, targets, *, steps: int = 50) -> jax.Array:
    """Integrated Gradients from a zero (grey) baseline, ``steps`` points: ``(N, K, H, W, 3)``."""
    x, t = _checked(model, x, targets)
    return integrated_gradients_core(model, x, t, checks.count(steps, "steps"))


def guided_backprop(model: Model, x, targets) -> jax.Array:
    """Guided Backprop: ReLU backward passes only positive gradients at active units: ``(N, K, H, W, 3)``."""
    x, t = _checked(model, x, targets)
    return method.pullback_core(model, x, t, settings.PRESETS["guided"].rules)


# --------------------------------------------------------------------------------------
# The paper's current explainers (lib/evaluator.py), "semantic" rules by default
# --------------------------------------------------------------------------------------

CURRENT_RULES = "semantic"


def soft_pullback(model: Model, x, targets, *, rules=CURRENT_RULES, **overrides) -> jax.Array:
    """SoftPullback: one gated gradient of each target logit, not normalised: ``(N, K, H, W, 3)``."""
    return method.pullback(model, x, targets, rules=rules, **overrides)


def _no_clip_option(options: dict, name: str) -> None:
    if "clip" in options:
        raise ValueError(f"{name} fixes its clamping: drop clip, or use pullback_ascent (which takes it)")


def pullback_ascent_no_clip(model: Model, x, targets, *, rules=CURRENT_RULES, **options) -> jax.Array:
    """PullbackAscent: x_K - x0 of the preset's ascent (5 steps, alpha 20, eps None for
    ``"semantic"``) with no clamping at all, so x_K may leave [-1, 1]: ``(N, K, H, W, 3)``."""
    _no_clip_option(options, "PullbackAscent")
    return method.ascent(model, x, targets, rules=rules, clip="none", output="diff", **options)


def pullback_ascent_clip_last(model: Model, x, targets, *, rules=CURRENT_RULES, **options) -> jax.Array:
    """PullbackAscentClipLast: the unclamped ascent, x_K clamped to [-1 - margin, 1 + margin]
    after the last step only; returns x_K - x0, ``(N, K, H, W, 3)``."""
    _no_clip_option(options, "PullbackAscentClipLast")
    return method.ascent(model, x, targets, rules=rules, clip="last", output="diff", **options)


def smooth_pullback(
    model: Model,
    x,
    targets,
    *,
    samples: int = 50,
    sigma: float = 0.15,
    seed: int = 0,
    rules=CURRENT_RULES,
    **overrides,
) -> jax.Array:
    """SmoothPullback: mean pullback over ``samples`` noisy copies (sigma in [-1, 1] units): ``(N, K, H, W, 3)``."""
    return _smooth(model, x, targets, settings.resolve(rules, **overrides), samples, sigma, seed)


EXPLAINERS: Dict[str, Explainer] = {
    "pullback": pullback,
    "pullback_ascent": pullback_ascent,
    "gradient": gradient,
    "gradient_ascent": gradient_ascent,
    "gradient_x_input": gradient_x_input,
    "smoothgrad": smoothgrad,
    "integrated_gradients": integrated_gradients,
    "guided_backprop": guided_backprop,
    "smoothgrad_pullback": smoothgrad_pullback,
    "SoftPullback": soft_pullback,
    "PullbackAscent": pullback_ascent_no_clip,
    "PullbackAscentClipLast": pullback_ascent_clip_last,
    "SmoothPullback": smooth_pullback,
}


# the explainers that follow a ``rules`` preset chosen by the caller (the CLI's --rules); the
# paper's current explainers take ``rules`` too, but default to "semantic", their version's
TAKE_RULES = ("pullback", "pullback_ascent", "gradient_ascent", "smoothgrad_pullback")


def get(name: str) -> Explainer:
    """The explainer called ``name``; ValueError listing the choices if there is none."""
    checks.choice(name, tuple(EXPLAINERS), "explainer")
    return EXPLAINERS[name]
