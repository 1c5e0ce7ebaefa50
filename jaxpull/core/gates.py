"""Excitation gates: the backward-only rules of the method, as ``jax.custom_vjp`` functions.

Every rule of METHOD.md's table lives here and nowhere else:

* ``relu``: forward ``max(z, 0)``; backward ``g * s(z / t)`` with ``s`` the sigmoid (paper,
  default t = 0.3) or the standard normal CDF Phi (follow-up, default t = 0.6).
* ``relu6``: forward ``clip(z, 0, 6)``; backward ``g * s(z / t) * s((6 - z) / t)``, one gate
  at each kink (a jaxpull extension).
* ``hardswish`` (MobileNetV3): forward ``z * hardsigmoid(z)``, ``hardsigmoid(u) =
  relu6(u + 3) / 6``; backward ``g * hardsigmoid(z / t)`` (a jaxpull extension: METHOD.md's
  general reading for ``f(z) = z * s(z)``, the gate ``s`` held constant and tempered; as
  t -> 0 it tends to the step at 0, not to the vanilla derivative). Its temperature is
  ``Gating.hardswish_temperature`` (None: the ReLU temperature).
* ``gelu`` (erf and tanh forms): backward ``g * Phi(z / t)``, the gate of ``z * Phi(z)`` held
  constant and tempered (default t = 1.0); ``Gating.gelu_temperature``.
* ``silu`` (Swish): backward ``g * sigmoid(z / t)`` (default t = 1.6); ``Gating.silu_temperature``.
* ``layer_norm`` (over the last axis; ConvNeXt's LayerNorm2d is the same on NHWC): with
  ``Gating.layer_norm == "detached"`` the mean and variance are held constant, backward
  ``g * gamma / sqrt(var + eps)``.
* ``attention_probs`` and ``tempered_attention``: ``"tempered"`` evaluates the attention's VJP at
  its in-projection inputs for query and key scaled by 1 / t (value unscaled), the scaling passed
  straight through (t = 1 is the plain gradient); ``"value_only"`` holds the attention weights
  constant, so the gradient flows through V only.
* Guided Backprop (Springenberg et al. 2015), a baseline: ``Gating(guided=True)`` makes the
  ReLU/ReLU6 backward ``g * 1[z > 0] * 1[g > 0]`` (ReLU6 also ``1[z < 6]``); max-pools and
  Hardswish keep their vanilla derivative (Guided Backprop is a rule for ReLUs).
* No rule (plain derivative, exact torch forward): ``hardsigmoid`` (SE-block scales) and the
  sigmoid.
* ``max_pool``: forward the hard max-pool; backward the VJP of *softmax pooling* over the same
  zero-padded windows, with the softmax weights differentiated (paper) or held constant
  (follow-up, ``pool_weights="detached"``). Ceil mode (``ceil_mode=True``: SqueezeNet,
  GoogLeNet) is a jaxpull definition: the forward is torch's ceil-mode max-pool exactly (the
  positions its last windows reach past the bottom/right edge are ignored), and the softmax
  pooling uses the same windows with those positions zero-filled, exactly like the symmetric
  padding (the natural extension of the reference's zero-padded ``unfold``).

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

from jaxpull.core import lowering

GATES = ("sigmoid", "normal_cdf")
POOL_WEIGHTS = ("soft", "detached")
LAYER_NORM_RULES = ("plain", "detached")
ATTENTION_RULES = ("plain", "tempered", "value_only")


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
      hardswish_temperature: Hardswish gate temperature (scalar array); None means "same as
        ``temperature``"; used when ``temperature`` is not None.
      gelu_temperature: GELU gate temperature (``g * Phi(z / t)``); None: plain derivative.
      silu_temperature: SiLU gate temperature (``g * sigmoid(z / t)``); None: plain derivative.
      layer_norm: ``"plain"`` (exact derivative) or ``"detached"`` (mean and variance held
        constant). Static.
      attention: ``"plain"``, ``"tempered"`` (VJP at the in-projection inputs scaled by
        1 / ``attention_temperature``, straight through) or ``"value_only"`` (attention weights
        held constant). Static.
      attention_temperature: the tempered attention's t (scalar array).
    """

    temperature: Optional[jax.Array] = None
    pool_temperature: Optional[jax.Array] = None
    gate: str = dataclasses.field(default="sigmoid", metadata=dict(static=True))
    pool_weights: str = dataclasses.field(default="soft", metadata=dict(static=True))
    guided: bool = dataclasses.field(default=False, metadata=dict(static=True))
    hardswish_temperature: Optional[jax.Array] = None
    gelu_temperature: Optional[jax.Array] = None
    silu_temperature: Optional[jax.Array] = None
    layer_norm: str = dataclasses.field(default="plain", metadata=dict(static=True))
    attention: str = dataclasses.field(default="plain", metadata=dict(static=True))
    attention_temperature: Optional[jax.Array] = None

    def __post_init__(self):
        temperatures = (
            self.temperature,
            self.hardswish_temperature,
            self.gelu_temperature,
            self.silu_temperature,
            self.attention_temperature,
        )
        if self.guided and (
            any(t is not None for t in temperatures) or self.layer_norm != "plain" or self.attention != "plain"
        ):
            raise ValueError("Guided Backprop takes no temperature or rule: use Gating(guided=True) alone")
        if self.layer_norm not in LAYER_NORM_RULES:
            raise ValueError(f"unknown layer_norm rule {self.layer_norm!r}: use one of {', '.join(LAYER_NORM_RULES)}")
        if self.attention not in ATTENTION_RULES:
            raise ValueError(f"unknown attention rule {self.attention!r}: use one of {', '.join(ATTENTION_RULES)}")
        if (self.attention == "tempered") != (self.attention_temperature is not None):
            raise ValueError('attention="tempered" needs attention_temperature, and only it takes one')

    @property
    def vanilla(self) -> bool:
        """True when every gate is the exact derivative."""
        return (
            self.temperature is None
            and not self.guided
            and self.gelu_temperature is None
            and self.silu_temperature is None
            and self.layer_norm == "plain"
            and self.attention == "plain"
        )


VANILLA = Gating()


def normal_cdf(z: jax.Array) -> jax.Array:
    """The standard normal CDF Phi as ``0.5 * (1 + erf(z / sqrt(2)))``, the reference's form.

    ``jax.scipy.special.ndtr`` (accurate far into the lower tail) costs about 5x more on XLA:CPU
    (mobilenet_v2, 2 images x 10 labels: 2.10 s vs 0.41 s per call); the two differ only where
    Phi < 1e-7, which no gate can tell from 0.
    """
    return 0.5 * (1 + lax.erf(z * jnp.asarray(0.7071067811865476, z.dtype)))


def gate_function(gate: str) -> Callable[[jax.Array], jax.Array]:
    """The smooth step ``s`` of a gate name: sigmoid or the standard normal CDF."""
    if gate == "sigmoid":
        return jax.nn.sigmoid
    if gate == "normal_cdf":
        return normal_cdf
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


def relu(z: jax.Array, gating: Gating) -> jax.Array:
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


def relu6(z: jax.Array, gating: Gating) -> jax.Array:
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
# Hardswish (and the plain hardsigmoid)
# --------------------------------------------------------------------------------------


def hardsigmoid(u: jax.Array) -> jax.Array:
    """``torch.nn.Hardsigmoid``: ``relu6(u + 3) / 6``, plain derivative (no excitation rule)."""
    return jnp.clip(u + 3, 0, 6) / 6


def _hardswish_forward(z: jax.Array) -> jax.Array:
    # torch's kernel, x * min(max(x + 3, 0), 6) / 6 (XLA turns / 6 into * (1/6): within 1 ulp).
    return z * jnp.clip(z + 3, 0, 6) / 6


def _hardswish_derivative(z: jax.Array) -> jax.Array:
    # PyTorch's hardswish_backward: 0 for z <= -3, z / 3 + 1/2 inside, 1 for z >= 3.
    return jnp.where(z <= -3, 0.0, jnp.where(z >= 3, 1.0, z / 3 + 0.5)).astype(z.dtype)


@jax.custom_vjp
def _hardswish_exact(z):
    return _hardswish_forward(z)


_hardswish_exact.defvjp(lambda z: (_hardswish_forward(z), z), lambda z, g: (g * _hardswish_derivative(z),))
_hardswish_soft = _soft_unit(_hardswish_forward, lambda z, t, s: hardsigmoid(z / t))


def hardswish(z: jax.Array, gating: Gating) -> jax.Array:
    """Hardswish whose backward pass is the tempered gate ``g * hardsigmoid(z / t)``.

    ``t`` is ``gating.hardswish_temperature``, or ``gating.temperature`` when that is None.
    Vanilla and Guided Backprop give torch's exact derivative.

    Args:
      z: pre-activations, any shape.
      gating: the backward rule.
    Returns:
      ``z * hardsigmoid(z)``, same shape and dtype as ``z``.
    """
    if gating.temperature is None:  # vanilla and Guided Backprop
        return _hardswish_exact(z)
    t = gating.hardswish_temperature if gating.hardswish_temperature is not None else gating.temperature
    return _hardswish_soft(z, jnp.asarray(t, jnp.float32), gating.gate)


# --------------------------------------------------------------------------------------
# GELU and SiLU: activations z * s(z), the gate s held constant and tempered
# --------------------------------------------------------------------------------------


def _gelu_forward(z: jax.Array, approximate: bool) -> jax.Array:
    return jax.nn.gelu(z, approximate=approximate)


_gelu_soft = {
    approximate: _soft_unit(functools.partial(_gelu_forward, approximate=approximate), lambda z, t, s: s(z / t))
    for approximate in (False, True)
}
_silu_soft = _soft_unit(jax.nn.silu, lambda z, t, s: s(z / t))


def gelu(z: jax.Array, gating: Gating, approximate: bool = False) -> jax.Array:
    """GELU whose backward pass is ``g * Phi(z / t)``, ``t = gating.gelu_temperature``.

    Args:
      z: pre-activations, any shape.
      gating: the backward rule; ``gelu_temperature`` None gives the exact derivative.
      approximate: torch's ``approximate="tanh"`` form (the gate is Phi for both forms).
    Returns:
      ``z * Phi(z)`` (or its tanh approximation), same shape and dtype as ``z``.
    """
    if gating.gelu_temperature is None:
        return _gelu_forward(z, approximate)
    return _gelu_soft[approximate](z, jnp.asarray(gating.gelu_temperature, jnp.float32), "normal_cdf")


def silu(z: jax.Array, gating: Gating) -> jax.Array:
    """SiLU (Swish) whose backward pass is ``g * sigmoid(z / t)``, ``t = gating.silu_temperature``.

    Args:
      z: pre-activations, any shape.
      gating: the backward rule; ``silu_temperature`` None gives the exact derivative.
    Returns:
      ``z * sigmoid(z)``, same shape and dtype as ``z``.
    """
    if gating.silu_temperature is None:
        return jax.nn.silu(z)
    return _silu_soft(z, jnp.asarray(gating.silu_temperature, jnp.float32), "sigmoid")


# --------------------------------------------------------------------------------------
# LayerNorm
# --------------------------------------------------------------------------------------


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


def layer_norm(
    x: jax.Array, scale: Optional[jax.Array], bias: Optional[jax.Array], eps: float, gating: Gating
) -> jax.Array:
    """``torch.nn.LayerNorm`` over the last axis (biased variance); with ``gating.layer_norm ==
    "detached"`` the mean and variance are held constant in the backward pass
    (``g * gamma / sqrt(var + eps)``), else its exact derivative.

    Args:
      x: ``(..., C)``; scale, bias: ``(C,)`` or None; eps: torch's ``eps``.
    Returns:
      ``(x - mean) / sqrt(var + eps) * scale + bias``, same shape as ``x``.
    """
    y = _normalize(x, eps, gating.layer_norm == "detached")
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    return y


# --------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------


def attention_probs(scores: jax.Array, gating: Gating) -> jax.Array:
    """``softmax(scores)`` over the last axis; held constant under ``attention="value_only"``.

    Args:
      scores: ``(..., Lq, Lk)`` attention logits (scaled, with any bias or mask added).
    Returns:
      the attention weights, same shape.
    """
    probs = jax.nn.softmax(scores, axis=-1)
    return lax.stop_gradient(probs) if gating.attention == "value_only" else probs


def straight_through_scale(x: jax.Array, t: jax.Array) -> jax.Array:
    """Forward ``x / t``; backward the identity (the scaling is passed straight through)."""
    return x + lax.stop_gradient(x / _safe_temperature(t, x.dtype) - x)


def tempered_attention(
    core: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    gating: Gating,
    q_bias: Optional[jax.Array] = None,
    k_bias: Optional[jax.Array] = None,
) -> jax.Array:
    """The attention rule around an attention layer, given its in-projections.

    ``q`` and ``k`` are the query and key in-projections *without their bias* (``x @ W_q``,
    ``x @ W_k``), ``v`` the value projection (bias included), ``core(q + q_bias, k + k_bias, v)``
    the attention from them to the heads' output; the caller applies the out-projection to what
    this returns (being linear and applied once, it commutes with the rule).

    The rule, as in the reference, which scales the *inputs* of ``nn.MultiheadAttention``: under
    ``attention="tempered"`` the forward is the exact ``core(q + q_bias, k + k_bias, v)`` and the
    backward is the VJP of ``core(q / t + q_bias, k / t + k_bias, v)`` with the 1 / t passed
    straight through, i.e. the VJP of the layer at query and key inputs scaled by 1 / t (the
    projection is linear; its bias is not scaled); t = 1 is the plain gradient. The projections
    are computed once for both (``(x @ W) / t`` equals ``(x / t) @ W`` up to float rounding).
    Otherwise it is ``core`` itself (whose softmax, through :func:`attention_probs`, applies
    ``"value_only"``).

    Args:
      core: ``(q, k, v) -> out``, any layout the model uses.
      q, k, v: the projections, shapes as ``core`` takes them; q_bias, k_bias: broadcastable
        to ``q`` and ``k``, or None (no bias).
    Returns:
      ``core``'s output (before the out-projection).
    """

    def biased(a: jax.Array, bias: Optional[jax.Array]) -> jax.Array:
        return a if bias is None else a + bias

    exact = core(biased(q, q_bias), biased(k, k_bias), v)
    if gating.attention != "tempered":
        return exact
    t = jnp.asarray(gating.attention_temperature, jnp.float32)
    soft = core(biased(straight_through_scale(q, t), q_bias), biased(straight_through_scale(k, t), k_bias), v)
    return soft - lax.stop_gradient(soft) + lax.stop_gradient(exact)


# --------------------------------------------------------------------------------------
# Max-pool
# --------------------------------------------------------------------------------------


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _surrogate_max_pool(x, t, window, stride, padding, pool_weights, ceil_mode):
    return hard_max_pool(x, window, stride, padding, ceil_mode)


def _surrogate_max_pool_fwd(x, t, window, stride, padding, pool_weights, ceil_mode):
    return hard_max_pool(x, window, stride, padding, ceil_mode), (x, t)


def soft_pool_derivative(v: jax.Array, t: jax.Array, pool_weights: str) -> jax.Array:
    """The derivative of softmax pooling ``sum_k w_k v_k`` (``w = softmax(v / t)``) with respect to
    each window value: ``w_k * (1 + (v_k - out) / t)``, or ``w_k`` with the weights ``"detached"``.

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
    t = _safe_temperature(t, v.dtype)
    u = v - jnp.max(v, axis=-1, keepdims=True)  # <= 0, exact for values within 2x of the maximum
    w = jax.nn.softmax(u / t, axis=-1)
    if pool_weights == "detached":
        return w
    if pool_weights != "soft":
        raise ValueError(f"unknown pool_weights {pool_weights!r}: use one of {', '.join(POOL_WEIGHTS)}")
    spread = u - jnp.sum(w * u, axis=-1, keepdims=True)  # v_k - out
    return jnp.where(w > 0, w * (1 + spread / t), 0.0)


def _surrogate_max_pool_bwd(window, stride, padding, pool_weights, ceil_mode, res, g):
    """Softmax pooling's VJP: the window derivative times ``g``, put back on the input
    (``lowering.scatter_views``). The derivative does not depend on the cotangent, so a vmapped
    pullback computes it once per image; autodiff's softmax backward took the cotangent inside
    and was recomputed per cotangent and tap (ResNet-50, K = 100: 1.3 s of a 7 s pullback)."""
    x, t = res
    v = window_values(x, window, stride, padding, ceil_mode)
    d = soft_pool_derivative(v, t, pool_weights)  # (N, Ho, Wo, C, k*k)
    pads = _pool_pads(x.shape, window, stride, padding, ceil_mode)
    gx = lowering.scatter_views(g, d.reshape(d.shape[:4] + (window, window)), stride, pads, x.shape[1:3])
    return gx.astype(x.dtype), jnp.zeros_like(t)


_surrogate_max_pool.defvjp(_surrogate_max_pool_fwd, _surrogate_max_pool_bwd)


def max_pool(
    x: jax.Array,
    window: int,
    stride: int,
    padding: int,
    gating: Gating,
    ceil_mode: bool = False,
) -> jax.Array:
    """Hard max-pool forward; softmax-pooling VJP backward (vanilla max-pool VJP if no temperature).

    Args:
      x: ``(N, H, W, C)``.
      window, stride, padding, ceil_mode: as ``torch.nn.MaxPool2d`` (dilation 1).
      gating: ``gating.pool_temperature`` is tp.
    Returns:
      ``(N, Ho, Wo, C)``, exactly torch's max-pool.
    """
    if gating.temperature is None:  # vanilla and Guided Backprop
        return hard_max_pool(x, window, stride, padding, ceil_mode)
    tp = gating.pool_temperature if gating.pool_temperature is not None else gating.temperature
    return _surrogate_max_pool(x, jnp.asarray(tp, jnp.float32), window, stride, padding, gating.pool_weights, ceil_mode)
