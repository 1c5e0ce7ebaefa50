"""The ReLU rule (``docs/method.md``, "ReLU and ReLU6"): the excitation gate of the method.

Forward ``max(z, 0)`` (ReLU6: ``clip(z, 0, 6)``), unchanged. Backward, by ``mode``:

* ``"gate"``: ``g * s(z / t)``, ``s`` the sigmoid (the paper's first version, t = 0.3) or the
  standard normal CDF Phi (its current version, t = 0.6). ReLU6 (a jaxpull extension: the paper's
  code has no ReLU6 rule) gets one gate at each kink, ``g * s(z / t) * s((6 - z) / t)``.
* ``"plain"``: the exact derivative as PyTorch autograd computes it (0 at z = 0; ReLU6: 0 at and
  beyond both kinks).
* ``"guided"``: Guided Backprop (Springenberg et al. 2015), ``g * 1[z > 0] * 1[g > 0]`` (ReLU6 also
  ``1[z < 6]``): a baseline, not the method.

As ``t -> 0`` the gate tends to the exact derivative (tests/test_gates.py); a temperature below the
smallest normal float32 is raised to it, where the gate already is the step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxpull.core import gates
from jaxpull.core.rules.base import Rule, check_choice, choice, number, validated


@functools.cache
def _units(max_value: float | None):
    """``(plain, guided, soft)`` units of ReLU (``max_value`` None) or of ReLU clipped at ``max_value``."""
    if max_value is None:
        forward = lambda z: jnp.maximum(z, 0)
        hard = lambda z: z > 0  # PyTorch's threshold_backward: the derivative at z == 0 is 0
        soft = lambda z, t, s: s(z / t)
    else:
        forward = lambda z: jnp.clip(z, 0, max_value)
        hard = lambda z: (z > 0) & (z < max_value)  # PyTorch's hardtanh_backward
        soft = lambda z, t, s: s(z / t) * s((max_value - z) / t)
    return (
        gates.hard_unit(forward, lambda z, g: hard(z)),
        gates.hard_unit(forward, lambda z, g: hard(z) & (g > 0)),
        gates.soft_unit(forward, soft),
    )


@validated
class ReLU(Rule):
    """The rule of every ReLU and ReLU6: ``rules.relu(z)``, ``rules.relu(z, max_value=6)``."""

    mode: str = choice(
        "gate",
        {
            "gate": "g * s(z / t) (ReLU6: g * s(z / t) * s((6 - z) / t))",
            "plain": "the exact derivative",
            "guided": "Guided Backprop, g * 1[z > 0] * 1[g > 0]",
        },
        "ReLU and ReLU6 backward",
    )
    temperature: float = number(0.6, "ReLU gate temperature t", plain_hint=True)
    gate: str = choice("normal_cdf", gates.GATE_SHAPES, "the ReLU gate's smooth step s")

    def __call__(self, z: jax.Array, max_value: float | None = None) -> jax.Array:
        """``max(z, 0)`` (or ``clip(z, 0, max_value)``) with this backward; same shape and dtype as ``z``."""
        if max_value is not None and max_value != 6:
            raise ValueError(f"max_value must be None (ReLU) or 6 (ReLU6), got {max_value!r}")
        plain, guided, soft = _units(None if max_value is None else 6)
        if self.mode == "plain":
            return plain(z)
        if self.mode == "guided":
            return guided(z)
        check_choice(self.mode, "ReLU.mode", ("gate",))
        return soft(z, gates.temperature(self.temperature), self.gate)
