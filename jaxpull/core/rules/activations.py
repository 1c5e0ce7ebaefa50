"""The rules of the activations of the form ``f(z) = z * s(z)`` (``docs/method.md``, "GELU, SiLU,
Hardswish"): the gate ``s`` held constant and tempered, backward ``g * s(z / t)``.

* :class:`GELU` (erf and tanh forms): ``s = Phi``, default t = 1.0 (the paper's current version).
* :class:`SiLU` (Swish): ``s = sigmoid``, default t = 1.6 (the paper's current version).
* :class:`Hardswish` (MobileNetV3): ``s = hardsigmoid``, a jaxpull extension (the paper has no
  Hardswish rule): as ``t -> 0`` it tends to the step at 0, not to the exact derivative.

Mode ``"plain"`` keeps the exact derivative (for Hardswish, PyTorch's ``hardswish_backward``).
The forward pass is always the exact activation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxpull.core import gates
from jaxpull.core.rules.base import Rule, choice, number, validated

GATE_MODES = {"gate": "g * s(z / t)", "plain": "the exact derivative"}


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
_hardswish_soft = gates.soft_unit(_hardswish_forward, lambda z, t, s: gates.hardsigmoid(z / t))
_gelu_soft = {
    approximate: gates.soft_unit(functools.partial(jax.nn.gelu, approximate=approximate), lambda z, t, s: s(z / t))
    for approximate in (False, True)
}
_silu_soft = gates.soft_unit(jax.nn.silu, lambda z, t, s: s(z / t))


@validated
class Hardswish(Rule):
    """The rule of every Hardswish: ``rules.hardswish(z)``, backward ``g * hardsigmoid(z / t)``."""

    mode: str = choice("gate", {**GATE_MODES, "gate": "g * hardsigmoid(z / t)"}, "Hardswish backward")
    temperature: float = number(0.6, "Hardswish gate temperature", plain_hint=True)

    def __call__(self, z: jax.Array) -> jax.Array:
        """``z * hardsigmoid(z)``, same shape and dtype as ``z``."""
        if self.mode == "plain":
            return _hardswish_exact(z)
        return _hardswish_soft(z, gates.temperature(self.temperature), "sigmoid")  # the shape is unused


@validated
class GELU(Rule):
    """The rule of every GELU: ``rules.gelu(z, approximate=False)``, backward ``g * Phi(z / t)``."""

    mode: str = choice("gate", {**GATE_MODES, "gate": "g * Phi(z / t)"}, "GELU backward")
    temperature: float = number(1.0, "GELU gate temperature", plain_hint=True)

    def __call__(self, z: jax.Array, approximate: bool = False) -> jax.Array:
        """``z * Phi(z)`` (``approximate``: torch's tanh form; the gate is Phi for both), shape of ``z``."""
        if self.mode == "plain":
            return jax.nn.gelu(z, approximate=approximate)
        return _gelu_soft[approximate](z, gates.temperature(self.temperature), "normal_cdf")


@validated
class SiLU(Rule):
    """The rule of every SiLU (Swish): ``rules.silu(z)``, backward ``g * sigmoid(z / t)``."""

    mode: str = choice("gate", {**GATE_MODES, "gate": "g * sigmoid(z / t)"}, "SiLU backward")
    temperature: float = number(1.6, "SiLU gate temperature", plain_hint=True)

    def __call__(self, z: jax.Array) -> jax.Array:
        """``z * sigmoid(z)``, same shape and dtype as ``z``."""
        if self.mode == "plain":
            return jax.nn.silu(z)
        return _silu_soft(z, gates.temperature(self.temperature), "sigmoid")
