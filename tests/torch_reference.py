"""A PyTorch implementation of the method, written from METHOD.md, to test jaxpull against.

It follows the reference implementation's approach: swap every ``nn.ReLU`` / ``nn.ReLU6`` /
``nn.MaxPool2d`` module for one whose forward is unchanged and whose backward is the gate
(``torch.autograd.Function``); max-pool's backward is the VJP of softmax pooling built with
``F.unfold`` (zero padding, as the reference). torchvision DenseNet's functional ReLU after
``features`` is gated too (jaxpull gates every ReLU), by running its forward by hand.
"""

from __future__ import annotations

import copy
from typing import Optional

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


def soft_pool(x, kernel, stride, padding, t, detached):
    b, c, h, w = x.shape
    unf = F.unfold(x, kernel_size=kernel, stride=stride, padding=padding).view(b, c, kernel * kernel, -1)
    weights = F.softmax(unf / t, dim=2)
    if detached:
        weights = weights.detach()
    ho = (h + 2 * padding - kernel) // stride + 1
    wo = (w + 2 * padding - kernel) // stride + 1
    return (unf * weights).sum(dim=2).view(b, c, ho, wo)


class SurrogateMaxPool(nn.Module):
    """Hard max-pool forward; softmax-pool gradient (the reference's hard + soft - soft.detach())."""

    def __init__(self, pool: nn.MaxPool2d, t: float, detached: bool):
        super().__init__()
        self.kernel, self.stride, self.padding = pool.kernel_size, pool.stride, pool.padding
        self.t, self.detached = t, detached

    def forward(self, x):
        hard = F.max_pool2d(x, self.kernel, self.stride, self.padding)
        soft = soft_pool(x, self.kernel, self.stride, self.padding, self.t, self.detached)
        return hard.detach() + (soft - soft.detach())


def gated(model: nn.Module, t: float, tp: Optional[float] = None, gate: str = "sigmoid", detached: bool = False) -> nn.Module:
    """A copy of ``model`` with every ReLU, ReLU6 and max-pool module swapped for its gated form."""
    model = copy.deepcopy(model)
    tp = t if tp is None else tp
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU6):
                setattr(parent, name, GatedReLU(t, gate, six=True))
            elif isinstance(child, nn.ReLU):
                setattr(parent, name, GatedReLU(t, gate))
            elif isinstance(child, nn.MaxPool2d):
                setattr(parent, name, SurrogateMaxPool(child, tp, detached))
    if type(model).__name__ == "DenseNet":
        relu = GatedReLU(t, gate)

        def forward(x, model=model):
            out = relu(model.features(x))
            return model.classifier(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))

        model.forward = forward
    return model


def normalize(x_nhwc: torch.Tensor, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> torch.Tensor:
    """[-1, 1] NHWC -> normalised NCHW, as jaxpull's model does."""
    x = x_nhwc.permute(0, 3, 1, 2)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
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


def ascent(model, x_nhwc, targets, steps=5, alpha=20.0, eps=100.0, clip=True, margin=0.0,
           relative_alpha=False, loss="logit", norm=normalize) -> torch.Tensor:
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
