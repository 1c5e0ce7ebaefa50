"""Shared fixtures: random torchvision models with random BatchNorm statistics, converted."""

from __future__ import annotations

import functools
import gc
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from jaxpull_convert.testing import random_images as images, random_torchvision_model, randomize_batchnorm  # noqa: E402,F401


@functools.lru_cache(maxsize=2)  # a few hundred MB each (vgg19: 550 MB twice): keep the suite's memory low
def torch_and_jax(arch: str, num_classes: int = 1000):
    """(eval-mode torch model, converted jaxpull model) for ``arch``, randomly initialised."""
    import jaxpull_convert

    tm = random_torchvision_model(arch, num_classes)
    return tm, jaxpull_convert.from_torch_module(arch, tm)


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


@pytest.fixture(scope="session")
def offline_cache(tmp_path_factory):
    """A model cache holding the offline default model, converted once for the whole session
    (the demo's test converts into a fresh cache of its own: first use is what it checks)."""
    from jaxpull.files import cache

    root = tmp_path_factory.mktemp("offline-cache")
    old = os.environ.get("JAXPULL_CACHE")
    os.environ["JAXPULL_CACHE"] = str(root)
    try:
        cache.resolve(cache.DEFAULT_MODEL, log=lambda m: None)
    finally:
        if old is None:
            del os.environ["JAXPULL_CACHE"]
        else:
            os.environ["JAXPULL_CACHE"] = old
    return root
