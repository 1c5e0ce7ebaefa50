"""Parity with PyTorch for torchvision's ConvNeXt (tiny, small, base, large).

* Every named model gets the shape check: its torchvision state_dict, built on the meta device
  (no weights in memory), goes through ``convnext.torch_layout`` and must give every parameter
  of the Flax module with its shape, and no missing or unused key; ``torch_config`` reads no
  size options off it.
* Numerical parity runs on a small torchvision ``ConvNeXt`` (three stages of widths 8, 16, 24,
  one block each: every code path of the named ones, stem, blocks, downsamplings, classifier),
  converted with ``from_torch_module`` (its ``block_setting`` recorded in ``ModelSpec.config``),
  on 72x72 images (72 -> 18 -> 9 -> 4: odd sizes floored as torch does). torchvision's init
  would make the test trivial (LayerNorm 1/0, zero biases, layer scales 1e-6 so that every
  residual branch vanishes, weights of std 0.02): all of them are randomised. ``measure_parity``:
  logits, both presets' pullbacks (the same rules here: ConvNeXt has no ReLU or max-pool, and
  both presets gate GELU at t = 1 and detach LayerNorm statistics), float64 vanilla gradients,
  one ascent. Each compiled function costs 5-15 s of CPU (the depthwise 7x7 convolutions are
  49 shifted views each), hence so few blocks.
* The GELU and LayerNorm rules act: switching either off changes the pullback, and the torch
  reference agrees with the variant.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.convnext import CNBlockConfig, ConvNeXt

import jaxpull
import jaxpull.core.models
import jaxpull_convert
from conftest import images
from helpers import (
    PARITY_METHODS,
    Parity,
    assert_logits_close,
    assert_parity,
    check_layout_shapes,
    map_errors,
    measure_parity,
)
from jaxpull.core.model import ModelSpec
from jaxpull.core.models import convnext
from jaxpull.core.settings import VANILLA
from jaxpull.files import model_file
from jaxpull_convert import torch_reference as R

# less codegen effort: each function runs once or twice, on small inputs (conftest.py)
pytestmark = pytest.mark.quick_compile

ARCHS = ["convnext_tiny", "convnext_small", "convnext_base", "convnext_large"]
SMALL_SETTING = ((8, 16, 1), (16, 24, 1), (24, None, 1))  # every code path; few blocks compile fast
TARGETS = np.array([[1, 7], [3, 0]])


@pytest.mark.parametrize("arch", ARCHS)
def test_torch_layout_gives_every_parameter_shape(arch):
    """torchvision's state_dict (meta device) maps onto exactly the Flax module's parameters."""
    with torch.device("meta"):
        tm = torchvision.models.get_model(arch, weights=None)
    assert convnext.torch_config(tm) == {}
    check_layout_shapes(arch, tm)


@pytest.mark.parametrize("arch", ARCHS)
def test_preprocessing_is_torchvisions(arch):
    t = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
    pre = jaxpull.core.models.get(arch).preprocessing
    assert (pre.crop_size, pre.resize_size, pre.interpolation) == (
        t.crop_size[0],
        t.resize_size[0],
        t.interpolation.value,
    )


def _small_convnext() -> ConvNeXt:
    """A small torchvision ConvNeXt with every parameter random and O(1) (eval mode)."""
    torch.manual_seed(0)
    tm = ConvNeXt([CNBlockConfig(*s) for s in SMALL_SETTING], num_classes=10).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in tm.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.reset_parameters()  # torch's default init: weights ~ 1/sqrt(fan_in), random biases
            elif isinstance(m, torch.nn.LayerNorm):  # LayerNorm2d too
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.4 * torch.rand(m.bias.shape, generator=g) - 0.2)
            elif type(m).__name__ == "CNBlock":
                m.layer_scale.copy_(0.3 + 0.7 * torch.rand(m.layer_scale.shape, generator=g))
    return tm


@functools.lru_cache(maxsize=1)
def _small():
    tm = _small_convnext()
    return tm, jaxpull_convert.from_torch_module("convnext_tiny", tm)


@pytest.fixture
def small():
    return _small()


GELU_OFF = "semantic without the GELU rule"


@functools.lru_cache(maxsize=1)
def parity() -> Parity:
    """Both presets, the vanilla gradient and the semantic preset without its GELU rule, one
    compiled function (and the excitation ascent), measured once for the tests below (called
    inside them: compiled at their codegen effort)."""
    methods = {**PARITY_METHODS, GELU_OFF: dict(rules="semantic", gelu="plain")}
    return measure_parity(*_small(), images(2, 72), TARGETS, methods, ascent_labels=1)


def test_small_model_records_its_block_setting(small, tmp_path):
    tm, model = small
    assert dict(model.spec.config) == {"block_setting": SMALL_SETTING}
    model_file.save(model, tmp_path / "small.safetensors")
    loaded = model_file.load(tmp_path / "small.safetensors")
    assert loaded.spec.config == model.spec.config
    x = images(2, 72, seed=3)
    with torch.no_grad():
        ref = tm(R.normalize(torch.from_numpy(x)))
    assert_logits_close(loaded(x), ref)


def test_matches_torch():
    """Logits, both presets' pullbacks, float64 vanilla gradients, the excitation ascent."""
    assert_parity(parity(), PARITY_METHODS, ascent_rel=1e-3)
    print("convnext (small config) parity:", parity().errors)


def test_gelu_and_layer_norm_rules_act():
    """Each rule changes the pullback: the semantic preset with the GELU rule off differs from
    the full preset (the GELU rule acts) and from the vanilla gradient, whose only other
    difference is the plain LayerNorm (the LayerNorm rule acts); the torch reference agrees
    with that variant too. (Measured with the other methods: no compiled function of its own.)"""
    p = parity()
    assert_parity(p, [GELU_OFF])
    full, gelu_off, vanilla = p.maps["semantic"], p.maps[GELU_OFF], p.maps["vanilla"]
    for rule, (a, b) in {"GELU": (full, gelu_off), "LayerNorm": (gelu_off, vanilla)}.items():
        cos, rel = map_errors(a, b)
        print(f"{rule} rule on vs off: cosine {cos:.4f}, max abs diff / max |off| {rel:.3f}")
        assert rel > 0.01, f"the {rule} rule changes the pullback only by {rel:.2e} (cosine {cos:.6f})"


def test_too_small_image_is_refused(small):
    _, model = small  # two downsamplings: 16 pixels at least
    with pytest.raises(ValueError, match="at least 16x16 pixels, got 15x15: use a larger image"):
        model(images(1, 15))
    module = ModelSpec("convnext_tiny").module()  # 72 passes, 28 does not (shapes only)
    jax.eval_shape(lambda x: module.init(jax.random.key(0), x, VANILLA), jnp.zeros((1, 72, 72, 3)))
    with pytest.raises(ValueError, match="at least 32x32 pixels, got 28x28"):
        jax.eval_shape(lambda x: module.init(jax.random.key(0), x, VANILLA), jnp.zeros((1, 28, 28, 3)))
