"""Gates: the ``jax.custom_vjp`` building blocks the backward rules are made of.

Every rule keeps the forward pass exact and changes one derivative (``docs/method.md``). The rules
themselves (what each layer kind's backward is, its settings and presets) live in
:mod:`jaxpull.core.rules`; this module holds what several of them share:

* :func:`soft_unit`: an activation whose VJP is ``g * mask(z, t, s)`` for a traced temperature ``t``
  and a static smooth step ``s`` (the ReLU, ReLU6, Hardswish, GELU and SiLU gates);
* :func:`hard_unit`: an activation whose VJP passes ``g`` where a predicate holds (the exact ReLU
  derivative as PyTorch computes it, and Guided Backprop);
* :func:`straight_through_scale`: forward ``x / t``, backward the identity (the attention rule);
* the smooth steps :func:`normal_cdf` and the sigmoid, and :func:`safe_temperature`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

# The smooth steps a ReLU gate may use (name -> meaning).
GATE_SHAPES = {
    "sigmoid": "s = sigmoid (the paper's first version)",
    "normal_cdf": "s = Phi, the standard normal CDF (its current version)",
}


def normal_cdf(z: jax.Array) -> jax.Array:
    """The standard normal CDF Phi as ``0.5 * (1 + erf(z / sqrt(2)))``, the reference's form.

    ``jax.scipy.special.ndtr`` (accurate far into the lower tail) costs about 5x more on XLA:CPU
    (mobilenet_v2, 2 images x 10 labels: 2.10 s vs 0.41 s per call); the two differ only where
    Phi < 1e-7, which no gate can tell from 0.
    """
    return 0.5 * (1 + lax.erf(z * jnp.asarray(0.7071067811865476, z.dtype)))


def gate_function(shape: str) -> Callable[[jax.Array], jax.Array]:
    """The smooth step ``s`` of a gate shape name (:data:`GATE_SHAPES`)."""
    if shape == "sigmoid":
        return jax.nn.sigmoid
    if shape == "normal_cdf":
        return normal_cdf
    raise ValueError(f"unknown gate {shape!r}: use one of {', '.join(GATE_SHAPES)}")


def safe_temperature(t: jax.Array, dtype) -> jax.Array:
    """``t`` in ``dtype``, raised to the smallest normal number.

    A subnormal temperature (1e-45 in float32) is flushed to zero by XLA, and ``0 / 0`` at a
    kink would be NaN; at the smallest normal ``t`` the gate is already the step function.
    """
    return jnp.maximum(t.astype(dtype), jnp.finfo(dtype).tiny)


def temperature(t) -> jax.Array:
    """A rule's temperature as the float32 array the kernels take."""
    return jnp.asarray(t, jnp.float32)


def hard_unit(forward: Callable, keep: Callable) -> Callable:
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


def soft_unit(forward: Callable, mask: Callable) -> Callable:
    """An activation ``unit(z, t, shape)`` whose VJP is ``g * mask(z, t, s)``, ``s`` the smooth step
    named ``shape`` (static); ``t`` is raised to the smallest normal float (:func:`safe_temperature`)."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
    def unit(z, t, shape):
        return forward(z)

    def fwd(z, t, shape):
        return forward(z), (z, t)

    def bwd(shape, res, g):
        z, t = res
        m = mask(z, safe_temperature(t, z.dtype), gate_function(shape))
        return g * m.astype(g.dtype), jnp.zeros_like(t)

    unit.defvjp(fwd, bwd)
    return unit


def straight_through_scale(x: jax.Array, t: jax.Array) -> jax.Array:
    """Forward ``x / t``; backward the identity (the scaling is passed straight through)."""
    return x + lax.stop_gradient(x / safe_temperature(t, x.dtype) - x)


def hardsigmoid(u: jax.Array) -> jax.Array:
    """``torch.nn.Hardsigmoid``: ``relu6(u + 3) / 6``, plain derivative (no rule of its own)."""
    return jnp.clip(u + 3, 0, 6) / 6
