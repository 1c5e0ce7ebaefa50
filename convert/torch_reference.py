"""A PyTorch implementation of the method, written from docs/method.md, to test jaxpull against.

Library code for the tests and the benchmarks (``from jaxpull_convert import torch_reference``);
it needs torch. Not used to compute explanations.

It follows the reference implementation's approach: swap every ``nn.ReLU`` / ``nn.ReLU6`` /
``nn.Hardswish`` / ``nn.MaxPool2d`` module for one whose forward is unchanged and whose backward
is the gate (``torch.autograd.Function``); max-pool's backward is the VJP of softmax pooling built
with ``F.unfold`` (zero padding, as the reference; in ceil mode zero-padded on the bottom/right as
far as torch's last windows reach). torchvision DenseNet's functional ReLU after
``features`` is gated too (jaxpull gates every ReLU), by running its forward by hand; so are
GoogLeNet's and Inception-v3's functional ReLUs and Inception-v3's functional max-pools.

The current version's rules (docs/method.md, "The rules"): ``nn.GELU`` and ``nn.SiLU``
swapped for gated forms, ``nn.LayerNorm`` (and ConvNeXt's ``LayerNorm2d``, a subclass) for one
with detached statistics, ``nn.MultiheadAttention`` (ViT) for a hand-written attention with the
tempered or value-only rule, timm's PVT-v2 ``pvt_v2.Attention`` for a hand-written spatial-reduction
attention with the same rules. Architectures whose attention is functional (Swin's
``shifted_window_attention``, MaxViT's ``RelativePositionalMultiHeadAttention``) are patched by
the functions in ``FAMILY_PATCHES``, keyed by the model's class name.
"""

from __future__ import annotations

import copy
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn


def smooth_step(z: torch.Tensor, gate: str) -> torch.Tensor:
    if gate == "sigmoid":
        return torch.sigmoid(z)
    if gate == "normal_cdf":
        return torch.special.ndtr(z)
    raise ValueError(gate)


class GatedReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, t, gate, six):
        ctx.save_for_backward(z)
        ctx.t, ctx.gate, ctx.six = t, gate, six
        return z.clamp(0, 6) if six else F.relu(z)

    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        mask = smooth_step(z / ctx.t, ctx.gate)
        if ctx.six:
            mask = mask * smooth_step((6 - z) / ctx.t, ctx.gate)
        return g * mask, None, None, None


class GatedReLU(nn.Module):
    def __init__(self, t: float, gate: str, six: bool = False):
        super().__init__()
        self.t, self.gate, self.six = t, gate, six

    def forward(self, z):
        return GatedReLUFunction.apply(z, self.t, self.gate, self.six)


class GuidedReLUFunction(torch.autograd.Function):
    """ReLU (ReLU6) forward; backward Guided Backprop's ``g * 1[z > 0] * 1[g > 0]`` (and ``1[z < 6]``)."""

    @staticmethod
    def forward(ctx, z, six):
        ctx.save_for_backward(z)
        ctx.six = six
        return z.clamp(0, 6) if six else F.relu(z)

    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        keep = (z > 0) & (g > 0)
        if ctx.six:
            keep = keep & (z < 6)
        return g * keep, None


class GuidedReLU(nn.Module):
    def __init__(self, six: bool = False):
        super().__init__()
        self.six = six

    def forward(self, z):
        return GuidedReLUFunction.apply(z, self.six)


class GatedHardswishFunction(torch.autograd.Function):
    """Hardswish forward; backward ``g * hardsigmoid(z / t)`` (the gate of z * hardsigmoid(z))."""

    @staticmethod
    def forward(ctx, z, t):
        ctx.save_for_backward(z)
        ctx.t = t
        return F.hardswish(z)

    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        return g * F.hardsigmoid(z / ctx.t), None


class GatedHardswish(nn.Module):
    def __init__(self, t: float):
        super().__init__()
        self.t = t

    def forward(self, z):
        return GatedHardswishFunction.apply(z, self.t)


def soft_pool(x, kernel, stride, padding, t, detached, ceil_mode=False):
    """Softmax pooling over zero-padded unfold windows; in ceil mode the windows of torch's
    ceil-mode max-pool, zero-padded on the bottom/right as far as they reach."""
    b, c, h, w = x.shape
    ho, wo = F.max_pool2d(x[:1, :1].detach(), kernel, stride, padding, ceil_mode=ceil_mode).shape[2:]
    extra_h = max((ho - 1) * stride + kernel - (h + 2 * padding), 0)
    extra_w = max((wo - 1) * stride + kernel - (w + 2 * padding), 0)
    xp = F.pad(x, (padding, padding + extra_w, padding, padding + extra_h))
    unf = F.unfold(xp, kernel_size=kernel, stride=stride).view(b, c, kernel * kernel, -1)
    weights = F.softmax(unf / t, dim=2)
    if detached:
        weights = weights.detach()
    return (unf * weights).sum(dim=2).view(b, c, ho, wo)


class GatedActivationFunction(torch.autograd.Function):
    """``f(z) = z * s(z)`` forward (GELU, SiLU); backward ``g * s(z / t)``."""

    @staticmethod
    def forward(ctx, z, t, kind, approximate):
        ctx.save_for_backward(z)
        ctx.t, ctx.kind = t, kind
        return F.gelu(z, approximate=approximate) if kind == "gelu" else F.silu(z)

    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        s = torch.special.ndtr if ctx.kind == "gelu" else torch.sigmoid
        return g * s(z / ctx.t), None, None, None


class GatedGELU(nn.Module):
    def __init__(self, t: float, approximate: str = "none"):
        super().__init__()
        self.t, self.approximate = t, approximate

    def forward(self, z):
        return GatedActivationFunction.apply(z, self.t, "gelu", self.approximate)


class GatedSiLU(nn.Module):
    def __init__(self, t: float):
        super().__init__()
        self.t = t

    def forward(self, z):
        return GatedActivationFunction.apply(z, self.t, "silu", "none")


def layer_norm(x, weight, bias, eps, detached: bool):
    """LayerNorm over the last axis, by hand; ``detached``: mean and variance held constant."""
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, keepdim=True, unbiased=False)
    if detached:
        mean, var = mean.detach(), var.detach()
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    return y + bias if bias is not None else y


class DetachedLayerNorm(nn.Module):
    """``nn.LayerNorm`` (last axis) or torchvision's ``LayerNorm2d`` (channels of NCHW) whose
    statistics are held constant in the backward pass."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        self.norm, self.channels_first = norm, type(norm).__name__ == "LayerNorm2d"

    def forward(self, x):
        n = self.norm
        if self.channels_first:
            x = x.permute(0, 2, 3, 1)
        y = layer_norm(x, n.weight, n.bias, n.eps, detached=True)
        return y.permute(0, 3, 1, 2) if self.channels_first else y


def straight_through_scale(x, t: float):
    """Forward ``x / t``; backward the identity."""
    return (x / t).detach() + (x - x.detach())


def attention_weights(scores, attention: str):
    """softmax over the last axis; detached under the "value_only" rule."""
    w = F.softmax(scores, dim=-1)
    return w.detach() if attention == "value_only" else w


def tempered(attend, query, key, value, attention: str, t: float | None):
    """The attention rule around ``attend(query, key, value)`` (inputs before the in-projection):
    under "tempered" the forward is exact and the backward that of ``attend(query / t, key / t,
    value)`` with the scaling passed straight through."""
    exact = attend(query, key, value)
    if attention != "tempered":
        return exact
    soft = attend(straight_through_scale(query, t), straight_through_scale(key, t), value)
    return soft - soft.detach() + exact.detach()


class RuledMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` (batch_first, no masks: torchvision ViT) computed by hand, with
    the attention rule ("tempered" at ``t`` or "value_only")."""

    def __init__(self, mha: nn.MultiheadAttention, attention: str, t: float | None):
        super().__init__()
        assert mha.batch_first and mha._qkv_same_embed_dim and mha.in_proj_bias is not None
        self.mha, self.attention, self.t = mha, attention, t

    def _attend(self, query, key, value):
        m = self.mha
        wq, wk, wv = m.in_proj_weight.chunk(3)
        bq, bk, bv = m.in_proj_bias.chunk(3)
        b, lq, e = query.shape
        h = m.num_heads
        split = lambda a: a.reshape(b, -1, h, e // h).transpose(1, 2)
        q, k, v = split(F.linear(query, wq, bq)), split(F.linear(key, wk, bk)), split(F.linear(value, wv, bv))
        w = attention_weights(q @ k.transpose(-2, -1) / (e // h) ** 0.5, self.attention)
        out = (w @ v).transpose(1, 2).reshape(b, lq, e)
        return m.out_proj(out)

    def forward(self, query, key, value, need_weights=False, **kw):
        assert not need_weights and not kw, "the reference handles ViT's unmasked self-attention only"
        return tempered(self._attend, query, key, value, self.attention, self.t), None


class SurrogateMaxPool(nn.Module):
    """Hard max-pool forward; softmax-pool gradient (the reference's hard + soft - soft.detach())."""

    def __init__(self, pool: nn.MaxPool2d, t: float, detached: bool):
        super().__init__()
        self.kernel, self.stride, self.padding = pool.kernel_size, pool.stride, pool.padding
        self.ceil_mode = pool.ceil_mode
        self.t, self.detached = t, detached

    def forward(self, x):
        hard = F.max_pool2d(x, self.kernel, self.stride, self.padding, ceil_mode=self.ceil_mode)
        soft = soft_pool(x, self.kernel, self.stride, self.padding, self.t, self.detached, self.ceil_mode)
        return hard.detach() + (soft - soft.detach())


# Patches for functional operations of a family, by the model's class name: ``patch(model, rules)``
# with ``rules`` a jaxpull ``Rules``.
FAMILY_PATCHES = {}


def relu_module(rule, six: bool = False) -> nn.Module | None:
    """The torch module of a jaxpull ReLU rule (None: the plain derivative, keep torch's own)."""
    if rule.mode == "gate":
        return GatedReLU(float(rule.temperature), rule.gate, six=six)
    if rule.mode == "guided":
        return GuidedReLU(six=six)
    return None


def max_pool_module(rule, pool: nn.MaxPool2d) -> nn.Module | None:
    """The torch module of a jaxpull max-pool rule around ``pool`` (None: keep it)."""
    if rule.mode == "plain":
        return None
    return SurrogateMaxPool(pool, float(rule.temperature), detached=rule.mode == "detached")


def _swap_relu(child, rule):
    if isinstance(child, nn.ReLU6):
        return relu_module(rule, six=True)
    if isinstance(child, nn.ReLU):
        return relu_module(rule)
    return None


def _swap_max_pool(child, rule):
    return max_pool_module(rule, child) if isinstance(child, nn.MaxPool2d) else None


def _swap_hardswish(child, rule):
    return GatedHardswish(float(rule.temperature)) if isinstance(child, nn.Hardswish) and rule.mode == "gate" else None


def _swap_gelu(child, rule):
    if isinstance(child, nn.GELU) and rule.mode == "gate":
        return GatedGELU(float(rule.temperature), child.approximate)
    return None


def _swap_silu(child, rule):
    return GatedSiLU(float(rule.temperature)) if isinstance(child, nn.SiLU) and rule.mode == "gate" else None


def _swap_layer_norm(child, rule):
    return DetachedLayerNorm(child) if isinstance(child, nn.LayerNorm) and rule.mode == "detached" else None


def _swap_attention(child, rule):
    if isinstance(child, nn.MultiheadAttention) and rule.mode != "plain":
        return RuledMultiheadAttention(child, rule.mode, float(rule.temperature))
    return None


class RuledPVTAttention(nn.Module):
    """timm's ``pvt_v2.Attention`` (PVT-v2's spatial-reduction attention) computed by hand, with the
    attention rule: ``"value_only"`` (the attention weights held constant) or ``"tempered"`` at ``t``
    (the query in-projection ``q`` and the key half of ``kv`` scaled by ``1 / t``, their biases not,
    the scaling passed straight through). The keys' and values' reduction (``sr``, ``norm``; the
    linear variant's ``pool`` and ``act``) runs through the module's own children, whose rules
    :func:`gated` swaps in."""

    def __init__(self, attn: nn.Module, attention: str, t: float | None):
        super().__init__()
        self.attn, self.attention, self.t = attn, attention, t

    def forward(self, x, feat_size):
        m = self.attn
        b, n, c = x.shape
        h, w = feat_size
        y = x
        if m.pool is not None:  # the linear variant: 7x7 adaptive pool, 1x1 conv, LayerNorm, GELU
            y = m.sr(m.pool(x.permute(0, 2, 1).reshape(b, c, h, w))).reshape(b, c, -1).permute(0, 2, 1)
            y = m.act(m.norm(y))
        elif m.sr is not None:
            y = m.norm(m.sr(x.permute(0, 2, 1).reshape(b, c, h, w)).reshape(b, c, -1).permute(0, 2, 1))
        wk, wv = m.kv.weight.chunk(2)
        bq = m.q.bias
        bk, bv = (None, None) if m.kv.bias is None else m.kv.bias.chunk(2)
        q, k, v = F.linear(x, m.q.weight), F.linear(y, wk), F.linear(y, wv, bv)  # q, k without their biases
        heads = lambda a: a.reshape(b, -1, m.num_heads, m.head_dim).transpose(1, 2)

        def attend(q, k, v):
            q = q if bq is None else q + bq
            k = k if bk is None else k + bk
            weights = attention_weights(heads(q) @ heads(k).transpose(-2, -1) * m.head_dim**-0.5, self.attention)
            return (weights @ heads(v)).transpose(1, 2).reshape(b, n, c)

        out = attend(q, k, v)
        if self.attention == "tempered":
            soft = attend(straight_through_scale(q, self.t), straight_through_scale(k, self.t), v)
            out = soft - soft.detach() + out.detach()
        return m.proj(out)


def _swap_sr_attention(child, rule):
    """PVT-v2's spatial-reduction attention (timm's ``pvt_v2.Attention``, recognised by its class
    name and module: this file does not import timm)."""
    kind = type(child)
    if kind.__name__ == "Attention" and kind.__module__ == "timm.models.pvt_v2" and rule.mode != "plain":
        return RuledPVTAttention(child, rule.mode, float(rule.temperature))
    return None


# The torch counterpart of every jaxpull rule (a field of ``jaxpull.Rules``): ``swap(child, rule)``
# returns the module that replaces ``child`` under ``rule``, or None to keep it. Functional operations
# (DenseNet's and the Inceptions' ReLUs and max-pools, Swin's and MaxViT's attention) are patched by
# ``_gate_functional_inception`` and ``FAMILY_PATCHES``. tests/test_rules.py checks that every rule
# field has an entry here.
SWAPS = {
    "relu": _swap_relu,
    "max_pool": _swap_max_pool,
    "hardswish": _swap_hardswish,
    "gelu": _swap_gelu,
    "silu": _swap_silu,
    "layer_norm": _swap_layer_norm,
    "attention": _swap_attention,
    "sr_attention": _swap_sr_attention,
}


def gated(model: nn.Module, rules="excitation", **overrides) -> nn.Module:
    """A copy of ``model`` whose backward pass follows jaxpull's ``rules`` (a ``jaxpull.Rules`` or a
    preset's name, with flat overrides as ``jaxpull.pullback`` takes them, concrete numbers): every
    module one of :data:`SWAPS` claims is replaced, the forward unchanged; functional operations are
    patched."""
    from jaxpull.core.settings import resolve

    rules = resolve(rules, **overrides)
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            for field, swap in SWAPS.items():
                new = swap(child, getattr(rules, field))
                if new is not None:
                    setattr(parent, name, new)
                    break
    if type(model).__name__ == "DenseNet":
        relu = relu_module(rules.relu) or nn.ReLU()

        def forward(x, model=model):
            out = relu(model.features(x))
            return model.classifier(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))

        model.forward = forward
    _gate_functional_inception(model, rules)
    if type(model).__module__.startswith("timm."):  # timm's own layers: jaxpull_convert.timm_reference
        from jaxpull_convert import timm_reference

        timm_reference.patch(model, rules)
    patch = FAMILY_PATCHES.get(type(model).__name__)
    if patch is not None:
        patch(model, rules)
    return model


def _basic_conv(m, relu, x):
    return relu(m.bn(m.conv(x)))


def _inception_b(m, pool, x):
    dbl = m.branch3x3dbl_3(m.branch3x3dbl_2(m.branch3x3dbl_1(x)))
    return [m.branch3x3(x), dbl, pool(x)]


def _inception_d(m, pool, x):
    b3 = m.branch3x3_2(m.branch3x3_1(x))
    b7 = m.branch7x7x3_4(m.branch7x7x3_3(m.branch7x7x3_2(m.branch7x7x3_1(x))))
    return [b3, b7, pool(x)]


def _gate_functional_inception(model, rules) -> None:
    """torchvision's GoogLeNet and Inception-v3 apply every ReLU functionally (``F.relu`` in
    ``BasicConv2d``), and Inception-v3's InceptionB/D their 3x3/2 max-pool (``F.max_pool2d``):
    gate those by hand too (jaxpull gates every ReLU and max-pool), their forward unchanged."""
    relu = relu_module(rules.relu)
    pool = max_pool_module(rules.max_pool, nn.MaxPool2d(3, 2))
    for m in model.modules():
        kind = type(m).__name__
        if kind == "BasicConv2d" and relu is not None:
            m.forward = functools.partial(_basic_conv, m, relu)
        elif kind in ("InceptionB", "InceptionD") and pool is not None:
            m._forward = functools.partial(_inception_b if kind == "InceptionB" else _inception_d, m, pool)


def normalize(x_nhwc: torch.Tensor, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> torch.Tensor:
    """[-1, 1] NHWC -> normalised NCHW, as jaxpull's model does."""
    x = x_nhwc.permute(0, 3, 1, 2)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return ((x + 1) / 2 - m) / s


def pullback(model, x_nhwc, targets, **kw) -> torch.Tensor:
    """(N, H, W, 3), (N, K) -> (N, K, H, W, 3) gradients of each target logit (kw: ``normalize``)."""
    norm = kw.get("norm", normalize)
    out = []
    for k in range(targets.shape[1]):
        x = x_nhwc.clone().requires_grad_(True)
        logits = model(norm(x))
        logits.gather(1, targets[:, k : k + 1]).sum().backward()
        out.append(x.grad)
    return torch.stack(out, 1)


def ascent(
    model,
    x_nhwc,
    targets,
    steps=5,
    alpha=20.0,
    eps=100.0,
    clip=True,
    margin=0.0,
    relative_alpha=False,
    loss="logit",
    norm=normalize,
) -> torch.Tensor:
    """The reference PGA loop per (image, target) pair, batched over pairs: -> (N, K, H, W, 3)."""
    n, k = targets.shape
    x0 = x_nhwc.repeat_interleave(k, 0)
    labels = targets.reshape(-1)
    x = x0.clone()
    for _ in range(steps):
        x = x.detach().requires_grad_(True)
        logits = model(norm(x))
        if loss == "logit":
            obj = logits.gather(1, labels[:, None]).sum()
        elif loss == "cross_entropy":
            obj = -F.cross_entropy(logits, labels, reduction="sum")
        else:
            obj = 0.5 * (logits**2).sum()
        (g,) = torch.autograd.grad(obj, x)
        with torch.no_grad():
            gnorm = g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            step = alpha * g / gnorm
            if relative_alpha:
                step = step * x.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            x = x + step
            if eps is not None:
                d = x - x0
                dn = d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
                x = x0 + d * (eps / torch.clamp(dn, min=eps))
            if clip:
                x = x.clamp(-1 - margin, 1 + margin)
    return x.detach().view(n, k, *x_nhwc.shape[1:])


def _maxvit_attention(m, attention: str, t: float | None, x):
    """torchvision MaxViT's ``RelativePositionalMultiHeadAttention.forward`` (``x`` ``(B, G, P, D)``)
    by hand, its functional softmax through :func:`attention_weights` and the whole layer
    (``to_qkv`` included; the relative position bias added unscaled) through :func:`tempered`."""
    b, g, p, d = x.shape
    h, dh = m.n_heads, m.head_dim
    wq, wk, wv = m.to_qkv.weight.chunk(3)
    bq, bk, bv = m.to_qkv.bias.chunk(3)
    split = lambda a: a.reshape(b, g, p, h, dh).permute(0, 1, 3, 2, 4)

    def attend(query, key, value):
        q, k, v = split(F.linear(query, wq, bq)), split(F.linear(key, wk, bk)), split(F.linear(value, wv, bv))
        scores = torch.einsum("bghid,bghjd->bghij", q, k * m.scale_factor) + m.get_relative_positional_bias()
        out = torch.einsum("bghij,bghjd->bghid", attention_weights(scores, attention), v)
        return m.merge(out.permute(0, 1, 3, 2, 4).reshape(b, g, p, d))

    return tempered(attend, x, x, x, attention, t)


def _patch_maxvit(model, rules) -> None:
    """MaxViT's attention is functional (``F.softmax`` in ``RelativePositionalMultiHeadAttention``;
    the paper's module swap leaves it plain): give it the attention rule, forward unchanged."""
    rule = rules.attention
    if rule.mode == "plain":
        return
    for m in model.modules():
        if type(m).__name__ == "RelativePositionalMultiHeadAttention":
            m.forward = functools.partial(_maxvit_attention, m, rule.mode, float(rule.temperature))


FAMILY_PATCHES["MaxVit"] = _patch_maxvit


def _swin_attend(m, relative_position_bias, attention: str, query, key, value):
    """torchvision's ``shifted_window_attention`` (eval mode) for one ``ShiftedWindowAttention(V2)``,
    its logic copied, with q, k and v projected from their own inputs and the softmax the rule's."""
    window_size, num_heads, logit_scale = m.window_size, m.num_heads, getattr(m, "logit_scale", None)
    B, H, W, C = query.shape
    pad_r = (window_size[1] - W % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - H % window_size[0]) % window_size[0]
    _, pad_H, pad_W, _ = F.pad(query, (0, 0, 0, pad_r, 0, pad_b)).shape
    shift_size = list(m.shift_size)
    if window_size[0] >= pad_H:
        shift_size[0] = 0
    if window_size[1] >= pad_W:
        shift_size[1] = 0
    num_windows = (pad_H // window_size[0]) * (pad_W // window_size[1])

    def windows(x):
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        if sum(shift_size) > 0:
            x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1]), dims=(1, 2))
        x = x.view(B, pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1], C)
        return x.permute(0, 1, 3, 2, 4, 5).reshape(B * num_windows, window_size[0] * window_size[1], C)

    qkv_bias = m.qkv.bias
    if logit_scale is not None and qkv_bias is not None:
        qkv_bias = qkv_bias.clone()
        length = qkv_bias.numel() // 3
        qkv_bias[length : 2 * length].zero_()
    weights = m.qkv.weight.chunk(3)
    biases = (None,) * 3 if qkv_bias is None else qkv_bias.chunk(3)

    def project(x, i):  # the i-th third of qkv (q, k, v), split into heads: (B*nW, heads, N, C / heads)
        y = F.linear(windows(x), weights[i], biases[i])
        return y.reshape(B * num_windows, -1, num_heads, C // num_heads).transpose(1, 2)

    q, k, v = project(query, 0), project(key, 1), project(value, 2)
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * (C // num_heads) ** -0.5).matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias
    n = attn.shape[-1]
    if sum(shift_size) > 0:
        attn_mask = query.new_zeros((pad_H, pad_W))
        h_slices = ((0, -window_size[0]), (-window_size[0], -shift_size[0]), (-shift_size[0], None))
        w_slices = ((0, -window_size[1]), (-window_size[1], -shift_size[1]), (-shift_size[1], None))
        count = 0
        for h in h_slices:
            for w in w_slices:
                attn_mask[h[0] : h[1], w[0] : w[1]] = count
                count += 1
        attn_mask = attn_mask.view(pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1])
        attn_mask = attn_mask.permute(0, 2, 1, 3).reshape(num_windows, window_size[0] * window_size[1])
        attn_mask = attn_mask.unsqueeze(1) - attn_mask.unsqueeze(2)
        attn_mask = attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0)
        attn = attn.view(B, num_windows, num_heads, n, n) + attn_mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, n, n)
    attn = attention_weights(attn, attention)
    x = attn.matmul(v).transpose(1, 2).reshape(B * num_windows, n, C)
    x = F.linear(x, m.proj.weight, m.proj.bias)
    x = x.view(B, pad_H // window_size[0], pad_W // window_size[1], window_size[0], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_H, pad_W, C)
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(shift_size[0], shift_size[1]), dims=(1, 2))
    return x[:, :H, :W, :].contiguous()


def _swin_attention(m, attention: str, t: float | None, x):
    bias = m.get_relative_position_bias()
    return tempered(functools.partial(_swin_attend, m, bias, attention), x, x, x, attention, t)


def _patch_swin(model, rules) -> None:
    """torchvision's Swin computes its window attention functionally (``shifted_window_attention``,
    ``F.softmax``), which a module swap misses: give each ``ShiftedWindowAttention(V2)`` the rule."""
    rule = rules.attention
    if rule.mode == "plain":
        return
    for m in model.modules():
        if type(m).__name__ in ("ShiftedWindowAttention", "ShiftedWindowAttentionV2"):
            m.forward = functools.partial(_swin_attention, m, rule.mode, float(rule.temperature))


FAMILY_PATCHES["SwinTransformer"] = _patch_swin
