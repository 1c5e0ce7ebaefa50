"""What the parity tests and the benchmarks share: random torchvision models whose parity
means something, random images, and the measure of agreement between two stacks of maps.

torchvision's initialisation leaves BatchNorm an identity map in eval mode (mean 0, variance 1,
weight 1, bias 0); :func:`randomize_batchnorm` draws its statistics and affine parameters so
that a parity test exercises the folded BatchNorm too.
"""

from __future__ import annotations

import numpy as np


def randomize_batchnorm(module, seed: int = 0) -> None:
    """Give every ``BatchNorm2d`` of a torch ``module`` random affine parameters and running statistics."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.4 * torch.rand(n, generator=g) - 0.2)


def random_torchvision_model(arch: str, num_classes: int = 1000, seed: int = 0):
    """torchvision's ``arch`` (timm's for ``timm/<name>``), randomly initialised (seeded), with
    random BatchNorm, in eval mode."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    if arch.startswith("timm/"):
        import timm

        tm = timm.create_model(arch[len("timm/") :], pretrained=False, num_classes=num_classes).eval()
    else:
        tm = torchvision.models.get_model(arch, weights=None, num_classes=num_classes).eval()
    randomize_batchnorm(tm, seed)
    return tm


def random_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """``(n, size, size, 3)`` float32 uniform in [-1, 1]."""
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def as_numpy(a) -> np.ndarray:
    """A torch tensor or array-like as a NumPy array."""
    return a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)


def map_errors(got, ref) -> tuple[float, float]:
    """(min cosine over maps, max abs error / max |ref|) for ``(N, K, ...)`` stacks of maps.

    Two maps that are both exactly zero agree (cosine 1: a ReLU before the logit can zero a
    whole vanilla map); one zero map against a nonzero one has no cosine (NaN, which fails
    every ``cos > ...`` check)."""
    got, ref = as_numpy(got), as_numpy(ref)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    g = got.reshape(got.shape[0] * got.shape[1], -1).astype(np.float64)
    r = ref.reshape(g.shape).astype(np.float64)
    norms = np.linalg.norm(g, axis=1) * np.linalg.norm(r, axis=1)
    both_zero = ~g.any(axis=1) & ~r.any(axis=1)
    with np.errstate(invalid="ignore"):
        cos = np.where(both_zero, 1.0, np.sum(g * r, 1) / norms)
    return float(cos.min()), float(np.abs(g - r).max() / np.abs(r).max())
