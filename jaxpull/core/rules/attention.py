"""The attention rules (``docs/method.md``, "Attention"), one rule object per kind of attention layer.

Forward: the layer's exact attention. Backward, by ``mode``:

* ``"tempered"``: the VJP of the layer evaluated at its query and key inputs scaled by ``1 / t``
  (their in-projections scaled, the projections' biases not), the scaling passed straight through;
  ``t = 1`` is the plain gradient (the paper's rule for ``nn.MultiheadAttention``);
* ``"value_only"``: the attention weights held constant, so the gradient flows through V only (the
  paper's rule for PVT-v2's spatial-reduction attention);
* ``"plain"``: the exact derivative.

A model chooses the rule object of its attention kind (``rules.attention`` for multi-head self-attention:
torchvision's ViT, Swin and MaxViT; ``rules.sr_attention`` for PVT-v2's spatial-reduction attention), so
one preset can treat two kinds differently, as the paper's code does.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax import lax

from jaxpull.core import gates
from jaxpull.core.rules.base import Rule, choice, number, validated

ATTENTION_MODES = {
    "tempered": "VJP at query and key scaled by 1/t, straight through (t = 1: the plain gradient)",
    "value_only": "attention weights held constant: the gradient flows through V only",
    "plain": "the exact derivative",
}
# Below this, query / t and key / t make float32 attention scores overflow (scores scale as 1 / t^2).
MIN_ATTENTION_TEMPERATURE = 1e-6


@validated
class Attention(Rule):
    """The rule of one kind of attention layer: ``rule(core, q, k, v, q_bias, k_bias)`` around the
    layer's attention, and ``rule.probs(scores)`` for its softmax."""

    mode: str = choice("tempered", ATTENTION_MODES, "attention backward")
    temperature: float = number(
        1.0,
        "tempered attention's t",
        low=MIN_ATTENTION_TEMPERATURE,
        hint=" (1 is the plain gradient)",
    )

    def probs(self, scores: jax.Array) -> jax.Array:
        """``softmax(scores)`` over the last axis ``(..., Lq, Lk)``; held constant under ``"value_only"``."""
        p = jax.nn.softmax(scores, axis=-1)
        return lax.stop_gradient(p) if self.mode == "value_only" else p

    def __call__(
        self,
        core: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        q_bias: jax.Array | None = None,
        k_bias: jax.Array | None = None,
    ) -> jax.Array:
        """The rule around an attention layer, given its in-projections.

        ``q`` and ``k`` are the query and key in-projections *without their bias* (``x @ W_q``,
        ``x @ W_k``), ``v`` the value projection (bias included), ``core(q + q_bias, k + k_bias, v)``
        the attention from them to the heads' output (its softmax through :meth:`probs`); the caller
        applies the out-projection to what this returns (linear and applied once, it commutes with
        the rule). Under ``"tempered"`` the forward is the exact ``core(q + q_bias, k + k_bias, v)``
        and the backward is the VJP of ``core(q / t + q_bias, k / t + k_bias, v)`` with the 1 / t
        passed straight through, as the reference scales the *inputs* of ``nn.MultiheadAttention``;
        the projections are computed once for both (``(x @ W) / t`` equals ``(x / t) @ W`` up to
        float rounding). Otherwise it is ``core`` itself.

        Args:
          core: ``(q, k, v) -> out``, any layout the model uses.
          q, k, v: the projections, shapes as ``core`` takes them; q_bias, k_bias: broadcastable
            to ``q`` and ``k``, or None (no bias).
        Returns:
          ``core``'s output (before the out-projection).
        """

        def biased(a: jax.Array, bias: jax.Array | None) -> jax.Array:
            return a if bias is None else a + bias

        exact = core(biased(q, q_bias), biased(k, k_bias), v)
        if self.mode != "tempered":
            return exact
        t = gates.temperature(self.temperature)
        scale = gates.straight_through_scale
        soft = core(biased(scale(q, t), q_bias), biased(scale(k, t), k_bias), v)
        return soft - lax.stop_gradient(soft) + lax.stop_gradient(exact)
