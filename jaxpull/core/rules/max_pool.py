"""The max-pool rule (``docs/method.md``, "MaxPool2d"): hard max-pool forward, softmax pooling backward.

Forward: ``torch.nn.MaxPool2d`` exactly. Backward, by ``mode``: the VJP of *softmax pooling* over the
same zero-padded windows (as the reference's ``unfold`` builds them), each window's values ``v``
weighted by ``w = softmax(v / tp)``, output ``sum_k w_k v_k``, with the weights

* ``"soft"``: differentiated (the paper's first version);
* ``"detached"``: held constant (its current version);
* ``"plain"``: the exact (hard) max-pool derivative.

Ceil mode (``ceil_mode=True``: SqueezeNet, GoogLeNet) is a jaxpull definition: the forward is torch's
ceil-mode max-pool exactly (positions its last windows reach past the bottom/right edge are ignored),
and the softmax pooling uses the same windows with those positions zero-filled, like the symmetric
padding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxpull.core import gates, lowering
from jaxpull.core.rules.base import Rule, choice, number, validated

POOL_MODES = {
    "soft": "softmax-pooling VJP, weights differentiated",
    "detached": "softmax-pooling VJP, weights held constant",
    "plain": "the exact max-pool derivative",
}


def pool_output_size(size: int, window: int, stride: int, padding: int, ceil_mode: bool = False) -> int:
    """Output length of torch's max-pool along one axis of length ``size``.

    Floor mode: ``(size + 2p - k) // s + 1``. Ceil mode: ``ceil((size + 2p - k) / s) + 1``, less
    one if the last window would start at or beyond ``size + p`` (torch's rule: every window
    starts inside the input or the left padding).
    """
    span = size + 2 * padding - window
    if span < 0:
        raise ValueError(
            f"max-pool window {window} is larger than the padded input ({size} + 2 * {padding}): "
            "use a larger input image"
        )
    if not ceil_mode:
        return span // stride + 1
    out = -(-span // stride) + 1
    if (out - 1) * stride >= size + padding:
        out -= 1
    return out


def _pool_pads(x_shape, window: int, stride: int, padding: int, ceil_mode: bool):
    """``((before, after), (before, after))`` for H and W: ``padding``, plus the extra rows and
    columns past the bottom/right edge that ceil mode's last windows reach into."""
    pads = []
    for size in x_shape[1:3]:
        out = pool_output_size(size, window, stride, padding, ceil_mode)
        extra = max((out - 1) * stride + window - (size + 2 * padding), 0)
        pads.append((padding, padding + extra))
    return tuple(pads)


def hard_max_pool(x: jax.Array, window: int, stride: int, padding: int, ceil_mode: bool = False) -> jax.Array:
    """``torch.nn.MaxPool2d(window, stride, padding, ceil_mode=ceil_mode)`` on ``(N, H, W, C)``.

    Padding, and ceil mode's positions past the edge, are ``-inf``: they never win the max.
    """
    ph, pw = _pool_pads(x.shape, window, stride, padding, ceil_mode)
    return lax.reduce_window(
        x, -jnp.inf, lax.max, (1, window, window, 1), (1, stride, stride, 1), ((0, 0), ph, pw, (0, 0))
    )


def window_values(x: jax.Array, window: int, stride: int, padding: int, ceil_mode: bool = False) -> jax.Array:
    """The pooling windows of ``x``, zero-padded as torch's ``unfold`` builds them.

    In ceil mode the windows are the hard max-pool's, and their positions past the bottom/right
    edge are zero-filled like the symmetric padding.

    Args:
      x: ``(N, H, W, C)``.
    Returns:
      ``(N, Ho, Wo, C, window * window)``, the window's values in row-major order.
    """
    pads = _pool_pads(x.shape, window, stride, padding, ceil_mode)  # ceil mode's extra rows included
    return jnp.stack(lowering.shifted_views(x, (window, window), stride, pads), axis=-1)


def soft_pool_derivative(v: jax.Array, t: jax.Array, detached: bool) -> jax.Array:
    """The derivative of softmax pooling ``sum_k w_k v_k`` (``w = softmax(v / t)``) with respect to
    each window value: ``w_k * (1 + (v_k - out) / t)``, or ``w_k`` with the weights ``detached``.

    ``v_k - out`` is computed from ``u = v - max(v)`` as ``u_k - sum_j w_j u_j``: the numbers that
    cancel are small, so it stays within 1.1e-6 of the float64 value at t = 0.25 where torch's
    float32 autograd is up to 4.8e-6 off (tests/test_gates.py, test_pools.py); a weight that
    underflows to 0 has derivative 0 however small ``t`` is (``softmax(v / t)`` itself overflows
    to NaN from t = 1e-38).

    Args:
      v: the windows, ``(..., window * window)`` (:func:`window_values`); t: the pool temperature.
    Returns:
      Same shape as ``v``.
    """
    t = gates.safe_temperature(t, v.dtype)
    u = v - jnp.max(v, axis=-1, keepdims=True)  # <= 0, exact for values within 2x of the maximum
    w = jax.nn.softmax(u / t, axis=-1)
    if detached:
        return w
    spread = u - jnp.sum(w * u, axis=-1, keepdims=True)  # v_k - out
    return jnp.where(w > 0, w * (1 + spread / t), 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _surrogate_max_pool(x, t, window, stride, padding, detached, ceil_mode):
    return hard_max_pool(x, window, stride, padding, ceil_mode)


def _surrogate_max_pool_fwd(x, t, window, stride, padding, detached, ceil_mode):
    return hard_max_pool(x, window, stride, padding, ceil_mode), (x, t)


def _surrogate_max_pool_bwd(window, stride, padding, detached, ceil_mode, res, g):
    """Softmax pooling's VJP: the window derivative times ``g``, put back on the input
    (``lowering.scatter_views``). The derivative does not depend on the cotangent, so a vmapped
    pullback computes it once per image; autodiff's softmax backward took the cotangent inside
    and was recomputed per cotangent and tap (ResNet-50, K = 100: 1.3 s of a 7 s pullback)."""
    x, t = res
    v = window_values(x, window, stride, padding, ceil_mode)
    d = soft_pool_derivative(v, t, detached)  # (N, Ho, Wo, C, k*k)
    pads = _pool_pads(x.shape, window, stride, padding, ceil_mode)
    gx = lowering.scatter_views(g, d.reshape(d.shape[:4] + (window, window)), stride, pads, x.shape[1:3])
    return gx.astype(x.dtype), jnp.zeros_like(t)


_surrogate_max_pool.defvjp(_surrogate_max_pool_fwd, _surrogate_max_pool_bwd)


@validated
class MaxPool(Rule):
    """The rule of every max-pool: ``rules.max_pool(x, window, stride, padding, ceil_mode=False)``."""

    mode: str = choice("detached", POOL_MODES, "max-pool backward")
    temperature: float = number(0.3, "max-pool softmax temperature tp", plain_hint=True)

    def __call__(self, x: jax.Array, window: int, stride: int, padding: int, ceil_mode: bool = False) -> jax.Array:
        """Hard max-pool of ``(N, H, W, C)`` (``torch.nn.MaxPool2d``, dilation 1) with this backward:
        ``(N, Ho, Wo, C)``, exactly torch's max-pool."""
        if self.mode == "plain":
            return hard_max_pool(x, window, stride, padding, ceil_mode)
        detached = self.mode == "detached"
        return _surrogate_max_pool(x, gates.temperature(self.temperature), window, stride, padding, detached, ceil_mode)
