"""Explanations: excitation pullbacks and the paper's projected gradient ascent (PGA).

Public functions validate their inputs, then call jitted pure cores that take the model (its
parameters are pytree leaves), the images, the targets and the temperatures as traced
arguments: a new temperature, label, step size or step count does not recompile.
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxpull import checks
from jaxpull.gates import GATES, POOL_WEIGHTS, Gating
from jaxpull.model import Model

STRATEGIES = ("auto", "shared", "separate")
LOSSES = ("logit", "cross_entropy", "self_explain")
OUTPUTS = ("image", "diff")

# "auto" uses vmapped separate gradients up to this many targets, the shared forward beyond.
# Measured on XLA:CPU (2 cores, resnet50 224x224, benchmarks/core_timings.py): the shared forward
# was as fast or faster for every K in {1, 2, 4, 10} (0.28 vs 0.30 s at K=1, 1.90 vs 2.13 s at
# K=10), so "auto" always shares the forward on CPU.
_SEPARATE_UP_TO = 0


def make_gating(
    temperature: Optional[float] = 0.3,
    pool_temperature: Optional[float] = None,
    gate: str = "sigmoid",
    pool_weights: str = "soft",
) -> Gating:
    """Validate call-time options and build a :class:`~jaxpull.gates.Gating`.

    ``temperature=None`` gives the exact vanilla gradient; ``pool_temperature=None`` means
    "same as temperature".
    """
    checks.choice(gate, GATES, "gate")
    checks.choice(pool_weights, POOL_WEIGHTS, "pool_weights")
    t = checks.temperature(temperature)
    tp = checks.temperature(pool_temperature, "pool_temperature")
    if t is None:
        if pool_temperature is not None:
            raise ValueError("pool_temperature needs a temperature: set temperature too, or neither for vanilla")
        return Gating(gate=gate, pool_weights=pool_weights)
    return Gating(t, t if tp is None else tp, gate, pool_weights)


# --------------------------------------------------------------------------------------
# Pullbacks
# --------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("strategy",))
def pullback_core(model: Model, x: jax.Array, targets: jax.Array, gating: Gating, strategy: str = "shared") -> jax.Array:
    """Pure pullback: ``x`` ``(N, H, W, 3)``, ``targets`` int ``(N, K)`` -> ``(N, K, H, W, 3)``.

    ``strategy="shared"`` runs one forward pass and vmaps its VJP over the K one-hot cotangents
    (the gated backward is linear in the cotangent); ``"separate"`` vmaps a whole gradient
    (forward included) over the K targets.
    """
    if strategy == "shared":
        _, vjp = jax.vjp(lambda x: model.apply(x, gating), x)
        cotangents = jax.nn.one_hot(targets.T, model.num_classes, dtype=jnp.float32)  # (K, N, C)
        (grads,) = jax.vmap(vjp)(cotangents)
    elif strategy == "separate":

        def one_target(t):  # t: (N,)
            def selected(x):
                logits = model.apply(x, gating)
                return jnp.sum(jnp.take_along_axis(logits, t[:, None], axis=1))

            return jax.grad(selected)(x)

        grads = jax.vmap(one_target)(targets.T)
    else:
        raise ValueError(f"unknown strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
    return jnp.swapaxes(grads, 0, 1)


def pullback(
    model: Model,
    x,
    targets,
    *,
    temperature: Optional[float] = 0.3,
    pool_temperature: Optional[float] = None,
    gate: str = "sigmoid",
    pool_weights: str = "soft",
    strategy: str = "auto",
) -> jax.Array:
    """Excitation pullbacks: the gated gradient of each target logit w.r.t. the input.

    Args:
      model: a converted model (``jaxpull.load``).
      x: images ``(N, H, W, 3)`` in [-1, 1].
      targets: class indices ``(K,)`` (the same K labels for every image) or ``(N, K)``.
      temperature: ReLU gate temperature t (paper: 0.3 with ``gate="sigmoid"``; follow-up: 0.6
        with ``gate="normal_cdf"``); ``None`` gives the exact vanilla gradient.
      pool_temperature: max-pool softmax temperature tp; ``None`` means "same as temperature".
      gate: ``"sigmoid"`` or ``"normal_cdf"``.
      pool_weights: ``"soft"`` (paper) or ``"detached"`` (follow-up).
      strategy: ``"shared"`` (one forward, VJP vmapped over targets), ``"separate"`` (vmapped
        gradients), or ``"auto"`` (the faster one measured on CPU for this K).
    Returns:
      ``(N, K, H, W, 3)`` float32: for every image and target, d logit / d x under the gates.
    """
    x = checks.images(x)
    t = checks.targets(targets, x.shape[0], model.num_classes)
    gating = make_gating(temperature, pool_temperature, gate, pool_weights)
    checks.choice(strategy, STRATEGIES, "strategy")
    if strategy == "auto":
        strategy = "separate" if t.shape[1] <= _SEPARATE_UP_TO else "shared"
    return pullback_core(model, x, t, gating, strategy)


# --------------------------------------------------------------------------------------
# Projected gradient ascent
# --------------------------------------------------------------------------------------


def _logit_loss(logits: jax.Array, t: jax.Array) -> jax.Array:
    return jnp.take_along_axis(logits, t[:, None], axis=1)[:, 0]


def _cross_entropy_loss(logits: jax.Array, t: jax.Array) -> jax.Array:
    # negative cross-entropy: ascent raises the target's log-probability
    return -optax.softmax_cross_entropy_with_integer_labels(logits, t)


def _self_explain_loss(logits: jax.Array, t: jax.Array) -> jax.Array:
    del t
    return 0.5 * jnp.sum(logits**2, axis=1)


LOSS_FUNCTIONS: Dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "logit": _logit_loss,
    "cross_entropy": _cross_entropy_loss,
    "self_explain": _self_explain_loss,
}


class _NoState(NamedTuple):
    pass


def normalized_step(alpha: jax.Array, relative: bool = False) -> optax.GradientTransformationExtraArgs:
    """The PGA step as an optax transform: ``g -> alpha * g / ||g||_2`` (per image).

    With ``relative=True`` the step is ``alpha * g * ||x||_2 / ||g||_2`` (x the current image).
    A zero gradient gives a zero step (where the reference would divide by zero). The step is
    an ascent step: add it (``optax.apply_updates``), do not negate it.
    """

    def init_fn(params):
        del params
        return _NoState()

    def update_fn(updates, state, params=None):
        norm = optax.tree.norm(updates)
        scale = alpha * (optax.tree.norm(params) if relative else 1.0)
        factor = jnp.where(norm > 0, scale / jnp.where(norm > 0, norm, 1.0), 0.0)
        return optax.tree.scale(factor, updates), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@functools.partial(jax.jit, static_argnames=("loss", "relative_alpha", "project", "clip"))
def ascent_core(
    model: Model,
    x: jax.Array,
    targets: jax.Array,
    gating: Gating,
    steps: jax.Array,
    alpha: jax.Array,
    eps: jax.Array,
    margin: jax.Array,
    *,
    loss: str = "logit",
    relative_alpha: bool = False,
    project: bool = True,
    clip: bool = True,
) -> jax.Array:
    """Pure PGA for every (image, target) pair: ``(N, H, W, 3)``, ``(N, K)`` -> ``(N, K, H, W, 3)``.

    Each step: g = gated gradient of the loss; x <- x + alpha * g / ||g||; project x - x0 onto
    the L2 ball of radius eps (if ``project``); clamp to [-1 - margin, 1 + margin] (if ``clip``).
    All N*K pairs advance together as one batch; ``steps`` is traced (a ``fori_loop``).
    """
    n, k = targets.shape
    x0 = jnp.repeat(x, k, axis=0)  # (N*K, H, W, 3), pair p = image p // K, target p % K
    labels = targets.reshape(-1)
    loss_fn = LOSS_FUNCTIONS[loss]
    step = normalized_step(alpha, relative_alpha)

    def objective(xs):
        return jnp.sum(loss_fn(model.apply(xs, gating), labels))

    def per_pair_update(g, xi):
        updates, _ = step.update(g, _NoState(), xi)
        return updates

    def body(_, xs):
        g = jax.grad(objective)(xs)  # samples are independent in eval mode: per-pair gradients
        xs = optax.apply_updates(xs, jax.vmap(per_pair_update)(g, xs))
        if project:
            xs = x0 + jax.vmap(optax.projections.projection_l2_ball, in_axes=(0, None))(xs - x0, eps)
        if clip:
            xs = optax.projections.projection_box(xs, -1.0 - margin, 1.0 + margin)
        return xs

    xs = lax.fori_loop(0, steps, body, x0)
    return xs.reshape((n, k) + x.shape[1:])


def ascent(
    model: Model,
    x,
    targets,
    *,
    steps: int = 5,
    alpha: float = 20.0,
    eps: Optional[float] = 100.0,
    temperature: Optional[float] = 0.3,
    pool_temperature: Optional[float] = None,
    gate: str = "sigmoid",
    pool_weights: str = "soft",
    relative_alpha: bool = False,
    clip: bool = True,
    margin: float = 0.0,
    loss: str = "logit",
    output: str = "image",
) -> jax.Array:
    """The paper's projected gradient ascent along excitation pullbacks, per (image, target).

    Args:
      model: a converted model.
      x: images ``(N, H, W, 3)`` in [-1, 1] (x0, the start of every ascent).
      targets: class indices ``(K,)`` or ``(N, K)``.
      steps: number of steps (default 5).
      alpha: step size (default 20); with ``relative_alpha`` the step is alpha * ||x||.
      eps: radius of the L2 ball around x0 the iterate is projected onto; None: no projection.
      temperature, pool_temperature, gate, pool_weights: the gates, as in :func:`pullback`
        (``temperature=None``: plain gradient ascent).
      clip: clamp every iterate to [-1 - margin, 1 + margin].
      loss: ``"logit"`` (target logit), ``"cross_entropy"`` (negative cross-entropy), or
        ``"self_explain"`` (0.5 * ||logits||^2, targets ignored).
      output: ``"image"`` returns x_K; ``"diff"`` returns x_K - x0 (the paper's figure).
    Returns:
      ``(N, K, H, W, 3)`` float32.
    """
    x = checks.images(x)
    t = checks.targets(targets, x.shape[0], model.num_classes)
    gating = make_gating(temperature, pool_temperature, gate, pool_weights)
    checks.choice(loss, LOSSES, "loss")
    checks.choice(output, OUTPUTS, "output")
    if not isinstance(steps, jax.core.Tracer) and (int(steps) != steps or steps < 0):
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    checks.positive(alpha, "alpha")
    if eps is not None:
        checks.positive(eps, "eps", " (use eps=None for no projection)")
    if not isinstance(margin, jax.core.Tracer) and not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin!r}")
    result = ascent_core(
        model, x, t, gating,
        jnp.asarray(steps, jnp.int32), jnp.asarray(alpha, jnp.float32),
        jnp.asarray(1.0 if eps is None else eps, jnp.float32), jnp.asarray(margin, jnp.float32),
        loss=loss, relative_alpha=relative_alpha, project=eps is not None, clip=clip,
    )
    return result - x[:, None] if output == "diff" else result
