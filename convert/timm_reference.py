"""The torch reference's counterparts of timm's layers (library code for the tests; needs timm).

:func:`jaxpull_convert.torch_reference.gated` swaps torch's own modules (``nn.ReLU``, ``nn.GELU``,
``nn.LayerNorm``, ``nn.MultiheadAttention``, ...); timm's models also use layers of timm's own,
which that swap does not know, and :func:`patch` (called by ``gated`` for a timm model) swaps
them the same way, forward unchanged:

- ``timm.layers.activations.GELU`` / ``GELUTanh`` (ConvNeXt's ``act_layer="gelu"``): the GELU rule;
- ``timm.layers.Attention`` (ViT, DeiT: fused ``qkv``, ``F.scaled_dot_product_attention``): the
  attention rule, by hand (:class:`RuledAttention`);
- ``timm.models.swin_transformer.WindowAttention``: the attention rule with the relative position
  bias and the shift mask added unscaled (:class:`RuledWindowAttention`).

Both attention layers follow ``torch_reference.tempered``: under "tempered" the backward is that of
the layer evaluated at its inputs scaled by ``1 / t`` for the q and k projections (straight
through), under "value_only" the softmax is detached. timm's other layers in the supported models
are torch modules the general swap reaches (``nn.ReLU``, ``nn.SiLU`` inside ``BatchNormAct2d``,
``nn.GELU``, ``nn.LayerNorm`` and timm's ``LayerNorm`` / ``LayerNorm2d`` subclasses, ``nn.MaxPool2d``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from jaxpull_convert import torch_reference as R


class RuledAttention(nn.Module):
    """timm's ``Attention`` (no mask, no qk norm, no gate) computed by hand under an attention rule."""

    def __init__(self, attn: nn.Module, attention: str, t: float):
        super().__init__()
        assert isinstance(attn.q_norm, nn.Identity) and isinstance(attn.norm, nn.Identity)
        assert getattr(attn, "gate", None) is None
        self.attn, self.attention, self.t = attn, attention, t

    def _attend(self, query, key, value):
        m = self.attn
        b, n, _ = query.shape
        weights = m.qkv.weight.chunk(3)
        biases = (None,) * 3 if m.qkv.bias is None else m.qkv.bias.chunk(3)
        split = lambda a: a.reshape(b, n, m.num_heads, m.head_dim).transpose(1, 2)
        q, k, v = (split(F.linear(a, w, bias)) for a, w, bias in zip((query, key, value), weights, biases, strict=True))
        w = R.attention_weights((q * m.scale) @ k.transpose(-2, -1), self.attention)
        return m.proj((w @ v).transpose(1, 2).reshape(b, n, -1))

    def forward(self, x, attn_mask=None, is_causal=False):
        assert attn_mask is None and not is_causal, "the reference handles ViT's unmasked self-attention only"
        return R.tempered(self._attend, x, x, x, self.attention, self.t)


class RuledWindowAttention(nn.Module):
    """timm Swin's ``WindowAttention`` on ``(B * nW, N, C)`` windows, by hand under an attention rule."""

    def __init__(self, attn: nn.Module, attention: str, t: float):
        super().__init__()
        self.attn, self.attention, self.t = attn, attention, t

    def _attend(self, mask, query, key, value):
        m = self.attn
        b, n, _ = query.shape
        weights = m.qkv.weight.chunk(3)
        biases = (None,) * 3 if m.qkv.bias is None else m.qkv.bias.chunk(3)
        split = lambda a: a.reshape(b, n, m.num_heads, -1).transpose(1, 2)
        q, k, v = (split(F.linear(a, w, bias)) for a, w, bias in zip((query, key, value), weights, biases, strict=True))
        scores = (q * m.scale) @ k.transpose(-2, -1) + m._get_rel_pos_bias()
        if mask is not None:
            windows = mask.shape[0]
            scores = scores.view(-1, windows, m.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            scores = scores.view(-1, m.num_heads, n, n)
        w = R.attention_weights(scores, self.attention)
        return m.proj((w @ v).transpose(1, 2).reshape(b, n, -1))

    def forward(self, x, mask: torch.Tensor | None = None):
        return R.tempered(lambda q, k, v: self._attend(mask, q, k, v), x, x, x, self.attention, self.t)


def swap(child: nn.Module, rules) -> nn.Module | None:
    """The module replacing one of timm's own layers under jaxpull ``rules``, or None to keep it."""
    from timm.layers import Attention
    from timm.layers.activations import GELU, GELUTanh
    from timm.models.swin_transformer import WindowAttention

    kind = type(child)
    if kind in (GELU, GELUTanh) and rules.gelu.mode == "gate":
        return R.GatedGELU(float(rules.gelu.temperature), "tanh" if kind is GELUTanh else "none")
    if rules.attention.mode != "plain":
        t = float(rules.attention.temperature)
        if kind is Attention:
            return RuledAttention(child, rules.attention.mode, t)
        if kind is WindowAttention:
            return RuledWindowAttention(child, rules.attention.mode, t)
    return None


def patch(model: nn.Module, rules) -> None:
    """Swap every timm layer of ``model`` (in place) that :func:`swap` claims."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = swap(child, rules)
            if new is not None:
                setattr(parent, name, new)
