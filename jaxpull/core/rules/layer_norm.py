"""The LayerNorm rule (``docs/method.md``, "LayerNorm"): statistics held constant in the backward pass.

Forward: ``torch.nn.LayerNorm`` over the last axis (biased variance), exactly; ConvNeXt's channels-first
``LayerNorm2d`` is the same on NHWC arrays. Backward, by ``mode``:

* ``"detached"``: the mean and variance held constant, ``g * gamma / sqrt(var + eps)`` (the paper's
  current version);
* ``"plain"``: the exact derivative.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxpull.core.rules.base import Rule, choice, validated


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _normalize(x: jax.Array, eps: float, detached: bool) -> jax.Array:
    mean = jnp.mean(x, axis=-1, keepdims=True)
    return (x - mean) * lax.rsqrt(jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True) + eps)


def _normalize_fwd(x, eps, detached):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    r = lax.rsqrt(jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True) + eps)
    xhat = (x - mean) * r
    return xhat, (xhat, r)


def _normalize_bwd(eps, detached, res, g):
    xhat, r = res
    if detached:  # mean and variance held constant
        return (g * r,)
    # the exact derivative, written out: autodiff's version of it, vmapped over K cotangents,
    # is miscompiled by XLA:CPU (jax 0.10) from about 2048 rows on (wrong maps for all but the
    # first cotangent); this form is not (tests/test_semantic_rules.py checks both at 4096 rows)
    return (r * (g - jnp.mean(g, axis=-1, keepdims=True) - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True)),)


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


@validated
class LayerNorm(Rule):
    """The rule of every LayerNorm: ``rules.layer_norm(x, scale, bias, eps)``."""

    mode: str = choice(
        "detached",
        {"detached": "mean and variance held constant: g * gamma / sqrt(var + eps)", "plain": "the exact derivative"},
        "LayerNorm backward",
    )

    def __call__(self, x: jax.Array, scale: jax.Array | None, bias: jax.Array | None, eps: float) -> jax.Array:
        """``(x - mean) / sqrt(var + eps) * scale + bias`` over the last axis of ``(..., C)`` (scale,
        bias ``(C,)`` or None); same shape as ``x``."""
        y = _normalize(x, eps, self.mode == "detached")
        if scale is not None:
            y = y * scale
        if bias is not None:
            y = y + bias
        return y
