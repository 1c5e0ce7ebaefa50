"""Shared fixtures: random torchvision models with random BatchNorm statistics, converted."""

from __future__ import annotations

import ctypes
import functools
import gc
import os
import shutil
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from jaxpull_convert.testing import random_images as images, random_torchvision_model, randomize_batchnorm  # noqa: E402,F401


def pytest_configure(config):
    """One persistent XLA compilation cache per test session, in a fresh folder: a computation
    compiled again (by a later module once the caches are released, by a CLI subprocess, by the
    notebook's kernel) is loaded instead of recompiled. The executables are the same ones, keyed
    by the computation, its compile options and the jax version, so no check changes."""
    import jax

    path = tempfile.mkdtemp(prefix="jaxpull-tests-xla-cache-")
    config._jaxpull_xla_cache = path
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path  # subprocesses inherit it
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


# Codegen effort. Tests that compile many large functions and run each once or twice on small
# inputs (the parity tests at 64x64, two images) spent most of their time in XLA:CPU's LLVM
# optimisation: googlenet's pullback compiles in 3.5 s instead of 7.3 s at the lower effort and
# then runs in 0.27 s instead of 0.09 s. Those tests are marked `quick_compile` and run with
# `jax_disable_most_optimizations`: it lowers only the backend's effort (LLVM -O0, no expensive
# passes), so the HLO is the same and the numbers are the same up to float rounding, which the
# tolerances cover. Everything else compiles at the default level, the code users run: tests
# whose execution outweighs their compiling (measured slower at -O0 in a full run: the evaluate
# report +16 s, integrated gradients +11 s, the sweep +5 s), the real-weights parity of
# test_real_model.py, and every command run as a subprocess.
#
# The flag is not part of the key of jit's in-memory cache (it is a compile option, not trace
# context): a function compiled at one level is reused at the other. So whenever the level changes
# from one test to the next, JAX's caches are cleared (the models stay); otherwise a quick test
# comparing two functions could compare one compiled at -O0 with one an earlier test compiled at
# the default level, and a default-level test could run an executable compiled at -O0. The
# persistent cache is keyed by the compile options, flag included, so it keeps both.
_LAST_EFFORT = {"quick": False}


@pytest.fixture(autouse=True)
def _codegen_effort(request):
    import jax

    quick = request.node.get_closest_marker("quick_compile") is not None
    if quick != _LAST_EFFORT["quick"]:
        jax.clear_caches()
        _LAST_EFFORT["quick"] = quick
    if not quick:
        yield
        return
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", False)


DESELECTED: list = []  # tests deselected in this session (-k, -m, --lf): a partial collection


def pytest_deselected(items):
    DESELECTED.extend(item.nodeid for item in items)


def pytest_unconfigure(config):
    shutil.rmtree(getattr(config, "_jaxpull_xla_cache", ""), ignore_errors=True)


@functools.lru_cache(maxsize=2)  # a few hundred MB each (vgg19: 550 MB twice): keep the suite's memory low
def torch_and_jax(arch: str, num_classes: int = 1000):
    """(eval-mode torch model, converted jaxpull model) for ``arch``, randomly initialised."""
    import jaxpull_convert

    tm = random_torchvision_model(arch, num_classes)
    return tm, jaxpull_convert.from_torch_module(arch, tm)


def release_memory() -> None:
    """Free the converted models, JAX's compiled functions, and the heap pages that freeing left
    behind (glibc keeps them otherwise: the suite's resident memory would only grow)."""
    import jax

    torch_and_jax.cache_clear()
    jax.clear_caches()
    gc.collect()
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@pytest.fixture(scope="module", autouse=True)
def _release_models_after_each_module():
    """Later modules rebuild what they need, so the suite's peak memory is that of one module."""
    yield
    release_memory()


@pytest.fixture(autouse=True)
def _release_models_after_each_large_test(request):
    """Tests marked ``large_models`` (one full-width architecture each) release everything
    after each test, so a module's peak is that of its largest test, not their sum."""
    yield
    if request.node.get_closest_marker("large_models"):
        release_memory()


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


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A converted random resnet18 file with ImageNet's 1000 class names (the CLI tests' model)."""
    import torch
    import torchvision

    import jaxpull
    import jaxpull_convert

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("m") / "resnet18.safetensors"
    jaxpull.save(jaxpull_convert.from_torch_module("resnet18", torchvision.models.resnet18().eval()), path)
    return path
