"""Excitation gates: the backward-only rules of the method, as ``jax.custom_vjp`` functions.

Every rule of METHOD.md's table lives here and nowhere else:

* ``relu``: forward ``max(z, 0)``; backward ``g * s(z / t)`` with ``s`` the sigmoid (paper,
  default t = 0.3) or the standard normal CDF Phi (follow-up, default t = 0.6).
* ``relu6``: forward ``clip(z, 0, 6)``; backward ``g * s(z / t) * s((6 - z) / t)``, one gate
  at each kink (a jaxpull extension).
* Guided Backprop (Springenberg et al. 2015), a baseline: ``Gating(guided=True)`` makes the
  ReLU/ReLU6 backward ``g * 1[z > 0] * 1[g > 0]`` (ReLU6 also ``1[z < 6]``); max-pools keep
  their vanilla derivative.
* ``max_pool``: forward the hard max-pool; backward the VJP of *softmax pooling* over the same
  zero-padded windows, with the softmax weights differentiated (paper) or held constant
  (follow-up, ``pool_weights="detached"``).

The forward pass is never changed. With ``Gating.temperature is None`` every rule is the
exact vanilla derivative, as PyTorch autograd computes it (ReLU's derivative at 0 is 0).
Temperatures are ordinary (traced) arrays, so changing one does not recompile, and
``jax.vmap`` over a batch of temperatures works.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.special import ndtr

GATES = ("sigmoid", "normal_cdf")
POOL_WEIGHTS = ("soft", "detached")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Gating:
    """How the backward pass treats ReLU and max-pool gates.

    Attributes:
      temperature: ReLU gate temperature t (scalar array), or None for the vanilla gradient.
      pool_temperature: max-pool softmax temperature tp (scalar array); used when
        ``temperature`` is not None.
      gate: ``"sigmoid"`` (paper) or ``"normal_cdf"`` (follow-up). Static.
      pool_weights: ``"soft"`` (gradient through the softmax weights, paper) or
        ``"detached"`` (weights held constant, follow-up). Static.
      guided: Guided Backprop's ReLU rule instead (needs ``temperature=None``). Static.
    """

    temperature: Optional[jax.Array] = None
    pool_temperature: Optional[jax.Array] = None
    gate: str = dataclasses.field(default="sigmoid", metadata=dict(static=True))
    pool_weights: str = dataclasses.field(default="soft", metadata=dict(static=True))
    guided: bool = dataclasses.field(default=False, metadata=dict(static=True))

    def __post_init__(self):
        if self.guided and self.temperature is not None:
            raise ValueError("Guided Backprop takes no temperature: use Gating(guided=True) alone")

    @property
    def vanilla(self) -> bool:
        """True when every gate is the exact (hard) derivative."""
        return self.temperature is None and not self.guided


VANILLA = Gating()


def gate_function(gate: str) -> Callable[[jax.Array], jax.Array]:
    """The smooth step ``s`` of a gate name: sigmoid or the standard normal CDF."""
    if gate == "sigmoid":
        return jax.nn.sigmoid
    if gate == "normal_cdf":
        return ndtr
    raise ValueError(f"unknown gate {gate!r}: use one of {', '.join(GATES)}")


# --------------------------------------------------------------------------------------
# ReLU and ReLU6
# --------------------------------------------------------------------------------------


def _relu_forward(z: jax.Array) -> jax.Array:
    return jnp.maximum(z, 0)


def _relu6_forward(z: jax.Array) -> jax.Array:
    return jnp.clip(z, 0, 6)


def _relu_hard_mask(z: jax.Array) -> jax.Array:
    # PyTorch's threshold_backward: the derivative at z == 0 is 0.
    return z > 0


def _relu6_hard_mask(z: jax.Array) -> jax.Array:
    # PyTorch's hardtanh_backward: zero at and beyond both kinks.
    return (z > 0) & (z < 6)


def _relu_soft_mask(z: jax.Array, t: jax.Array, s) -> jax.Array:
    return s(z / t)


def _relu6_soft_mask(z: jax.Array, t: jax.Array, s) -> jax.Array:
    return s(z / t) * s((6 - z) / t)


def _safe_temperature(t: jax.Array, dtype) -> jax.Array:
    """``t`` in ``dtype``, raised to the smallest normal number.

    A subnormal temperature (1e-45 in float32) is flushed to zero by XLA, and ``0 / 0`` at a
    kink would be NaN; at the smallest normal ``t`` the gate is already the step function.
    """
    return jnp.maximum(t.astype(dtype), jnp.finfo(dtype).tiny)


def _hard_unit(forward, keep):
    """An activation whose VJP passes ``g`` where ``keep(z, g)`` and 0 elsewhere."""

    @jax.custom_vjp
    def unit(z):
        return forward(z)

    def fwd(z):
        return forward(z), z

    def bwd(z, g):
        return (jnp.where(keep(z, g), g, jnp.zeros_like(g)),)

    unit.defvjp(fwd, bwd)
    return unit


def _soft_unit(forward, mask):
    """An activation whose VJP is ``g * mask(z, t, s)``; ``gate`` (the name of s) is static."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
    def unit(z, t, gate):
        return forward(z)

    def fwd(z, t, gate):
        return forward(z), (z, t)

    def bwd(gate, res, g):
        z, t = res
        m = mask(z, _safe_temperature(t, z.dtype), gate_function(gate))
        return g * m.astype(g.dtype), jnp.zeros_like(t)

    unit.defvjp(fwd, bwd)
    return unit


# Vanilla: exactly PyTorch autograd's derivative. Guided Backprop: also only where g > 0.
_relu_hard = _hard_unit(_relu_forward, lambda z, g: _relu_hard_mask(z))
_relu6_hard = _hard_unit(_relu6_forward, lambda z, g: _relu6_hard_mask(z))
_relu_guided = _hard_unit(_relu_forward, lambda z, g: _relu_hard_mask(z) & (g > 0))
_relu6_guided = _hard_unit(_relu6_forward, lambda z, g: _relu6_hard_mask(z) & (g > 0))
_relu_soft = _soft_unit(_relu_forward, _relu_soft_mask)
_relu6_soft = _soft_unit(_relu6_forward, _relu6_soft_mask)


def relu(z: jax.Array, gating: Gating = VANILLA) -> jax.Array:
    """ReLU whose backward pass is the excitation gate ``g * s(z / t)``.

    Args:
      z: pre-activations, any shape.
      gating: the backward rule; ``gating.temperature is None`` gives the exact derivative.
    Returns:
      ``max(z, 0)``, same shape and dtype as ``z``.
    """
    if gating.guided:
        return _relu_guided(z)
    if gating.vanilla:
        return _relu_hard(z)
    return _relu_soft(z, jnp.asarray(gating.temperature, jnp.float32), gating.gate)


def relu6(z: jax.Array, gating: Gating = VANILLA) -> jax.Array:
    """ReLU6 whose backward pass is ``g * s(z / t) * s((6 - z) / t)``.

    Args:
      z: pre-activations, any shape.
      gating: the backward rule; ``gating.temperature is None`` gives the exact derivative.
    Returns:
      ``clip(z, 0, 6)``, same shape and dtype as ``z``.
    """
    if gating.guided:
        return _relu6_guided(z)
    if gating.vanilla:
        return _relu6_hard(z)
    return _relu6_soft(z, jnp.asarray(gating.temperature, jnp.float32), gating.gate)


# --------------------------------------------------------------------------------------
# Max-pool
# --------------------------------------------------------------------------------------


def _pool_geometry(x_shape, window: int, stride: int, padding: int):
    n, h, w, c = x_shape
    ho = (h + 2 * padding - window) // stride + 1
    wo = (w + 2 * padding - window) // stride + 1
    return ho, wo


def hard_max_pool(x: jax.Array, window: int, stride: int, padding: int) -> jax.Array:
    """``torch.nn.MaxPool2d(window, stride, padding)`` (floor mode) on ``(N, H, W, C)``."""
    return lax.reduce_window(
        x, -jnp.inf, lax.max, (1, window, window, 1), (1, stride, stride, 1),
        ((0, 0), (padding, padding), (padding, padding), (0, 0)),
    )


def window_values(x: jax.Array, window: int, stride: int, padding: int) -> jax.Array:
    """The pooling windows of ``x``, zero-padded as torch's ``unfold`` builds them.

    Args:
      x: ``(N, H, W, C)``.
    Returns:
      ``(N, Ho, Wo, C, window * window)``, the window's values in row-major order.
    """
    ho, wo = _pool_geometry(x.shape, window, stride, padding)
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    views = []
    for i in range(window):
        for j in range(window):
            views.append(
                lax.slice(
                    xp,
                    (0, i, j, 0),
                    (xp.shape[0], i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, xp.shape[3]),
                    (1, stride, stride, 1),
                )
            )
    return jnp.stack(views, axis=-1)


def soft_max_pool(
    x: jax.Array, t: jax.Array, window: int, stride: int, padding: int, pool_weights: str = "soft"
) -> jax.Array:
    """Softmax pooling: per window, ``sum(softmax(v / t) * v)`` over zero-padded windows.

    Args:
      x: ``(N, H, W, C)``.
      t: the pool temperature tp (scalar).
      pool_weights: ``"soft"`` differentiates the weights, ``"detached"`` holds them constant.
    Returns:
      ``(N, Ho, Wo, C)``.
    """
    v = window_values(x, window, stride, padding)
    w = jax.nn.softmax(v / _safe_temperature(t, v.dtype), axis=-1)
    if pool_weights == "detached":
        w = lax.stop_gradient(w)
    elif pool_weights != "soft":
        raise ValueError(f"unknown pool_weights {pool_weights!r}: use one of {', '.join(POOL_WEIGHTS)}")
    return jnp.sum(w * v, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _surrogate_max_pool(x, t, window, stride, padding, pool_weights):
    return hard_max_pool(x, window, stride, padding)


def _surrogate_max_pool_fwd(x, t, window, stride, padding, pool_weights):
    return hard_max_pool(x, window, stride, padding), (x, t)


def _surrogate_max_pool_bwd(window, stride, padding, pool_weights, res, g):
    x, t = res
    _, vjp = jax.vjp(lambda x: soft_max_pool(x, t, window, stride, padding, pool_weights), x)
    (gx,) = vjp(g)
    return gx, jnp.zeros_like(t)


_surrogate_max_pool.defvjp(_surrogate_max_pool_fwd, _surrogate_max_pool_bwd)


def max_pool(
    x: jax.Array, window: int, stride: int, padding: int = 0, gating: Gating = VANILLA
) -> jax.Array:
    """Hard max-pool forward; softmax-pooling VJP backward (vanilla max-pool VJP if no temperature).

    Args:
      x: ``(N, H, W, C)``.
      window, stride, padding: as ``torch.nn.MaxPool2d`` (floor mode, dilation 1).
      gating: ``gating.pool_temperature`` is tp.
    Returns:
      ``(N, Ho, Wo, C)``, exactly torch's max-pool.
    """
    if gating.temperature is None:  # vanilla and Guided Backprop
        return hard_max_pool(x, window, stride, padding)
    tp = gating.pool_temperature if gating.pool_temperature is not None else gating.temperature
    return _surrogate_max_pool(
        x, jnp.asarray(tp, jnp.float32), window, stride, padding, gating.pool_weights
    )
