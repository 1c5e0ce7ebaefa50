"""Shared fixtures: random torchvision models with random BatchNorm statistics, converted."""

from __future__ import annotations

import functools
import gc
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))


def randomize_batchnorm(module, seed: int = 0) -> None:
    """Give every BatchNorm random affine parameters and running statistics (eval-mode parity
    would otherwise test an identity map)."""
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


@functools.lru_cache(maxsize=2)  # a few hundred MB each (vgg19: 550 MB twice): keep the suite's memory low
def torch_and_jax(arch: str, num_classes: int = 1000):
    """(eval-mode torch model, converted jaxpull model) for ``arch``, randomly initialised."""
    import torch
    import torchvision

    import jaxpull_convert

    torch.manual_seed(0)
    tm = torchvision.models.get_model(arch, weights=None, num_classes=num_classes).eval()
    randomize_batchnorm(tm)
    return tm, jaxpull_convert.from_torch_module(arch, tm)


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """``(n, size, size, 3)`` float32 in [-1, 1], smooth enough to look like images."""
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


@pytest.fixture(scope="module", autouse=True)
def _release_models_after_each_module():
    """Free the converted models and JAX's compiled functions once a test module is done: later
    modules rebuild what they need, and the suite's peak memory stays that of one module."""
    yield
    import jax

    torch_and_jax.cache_clear()
    jax.clear_caches()
    gc.collect()


@pytest.fixture
def tiny_model():
    """resnet18 with 10 classes: small and quick for property tests."""
    return torch_and_jax("resnet18", 10)[1]
