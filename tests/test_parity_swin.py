"""Parity with PyTorch for torchvision's Swin Transformer (swin_t/s/b) and Swin V2 (swin_v2_t/s/b).

Every full-size builder gets the shape check: its torchvision state_dict, built on the meta device
(no weights in memory), goes through ``swin.torch_layout`` and must give every parameter of the
Flax module, with its shape, and no missing or unused key; ``torch_config`` reads ``{}`` off it.

Numeric parity runs on one small model per version (``SwinTransformer(patch_size=[4, 4],
embed_dim=16, depths=[1, 2], num_heads=[1, 2], window_size=[4, 4])``, V2 with its blocks and
patch merging), converted through ``torch_config``, on images whose sides are no multiple of the
window (stage 2 is padded and its second block shifted). What torchvision's init leaves trivial
is randomised: LayerNorm affines, every bias (V2's key bias too, which both sides must ignore),
linear weights (unit gain, O(1) logits), V1's relative position bias tables, V2's ``cpb_mlp`` and
logit scales (one above log 100, so the clamp acts). The checks (``measure_parity``, one compiled
function per model): logits, both presets against ``torch_reference.gated``, float64 vanilla
gradients, V1's 5-step ascent, and the "value_only" and tempered (t = 0.5) attention rules against
the reference's Swin patch.

V2's 5-step ascent is not compared: on this random model it is chaotic in torch itself (an input
perturbation of 1e-6 changes x_K - x0 by 1e-2 of its largest value; float32 vs float64 torch by
up to 3e-2), so it is checked over 2 steps, where rounding has not yet been amplified.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

import jaxpull
import jaxpull.core.models
import jaxpull_convert
from helpers import (
    PARITY_METHODS,
    Parity,
    assert_maps_close,
    assert_parity,
    check_layout_shapes,
    map_errors,
    measure_parity,
)
from jaxpull.core.models import swin
from jaxpull.core.settings import resolve_ascent
from jaxpull_convert import torch_reference as R

# less codegen effort: each function runs once or twice, on small inputs (conftest.py)
pytestmark = pytest.mark.quick_compile

ALL = ["swin_t", "swin_s", "swin_b", "swin_v2_t", "swin_v2_s", "swin_v2_b"]
SMALL = dict(patch_size=[4, 4], embed_dim=16, depths=[1, 2], num_heads=[1, 2], window_size=[4, 4])
SIZES = {False: (44, 36), True: (36, 52)}  # (H, W): stage 1 11x9 / 9x13, stage 2 6x5 / 5x7, window 4
TARGETS = np.array([[1, 7], [3, 5]])


def _randomize(tm: torch.nn.Module, seed: int = 0) -> None:
    """Make every parameter matter: LayerNorm affines near 1 / 0, biases, unit-gain linear weights,
    relative position bias tables O(1), logit scales around log 10 (the first one above log 100)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tm.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("relative_position_bias_table"):
                p.copy_(r)
            elif name.endswith("logit_scale"):
                p.copy_(math.log(10) + 0.5 * r)
            elif name.endswith("bias"):
                p.copy_(0.3 * r)
            elif "norm" in name:
                p.copy_(1 + 0.3 * r)
            elif p.ndim == 2:
                p.copy_(r / math.sqrt(p.shape[1]))
        attn = tm.features[1][0].attn
        if hasattr(attn, "logit_scale"):
            attn.logit_scale.view(-1)[0] = 5.0  # exp(min(5, log 100)) = 100


@functools.lru_cache(maxsize=2)
def _small(v2: bool):
    """(small random torch Swin in eval mode, its conversion), V1 or V2."""
    torch.manual_seed(0)
    kw = dict(block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2) if v2 else {}
    tm = SwinTransformer(**SMALL, num_classes=10, **kw).eval()
    _randomize(tm)
    return tm, jaxpull_convert.from_torch_module("swin_v2_t" if v2 else "swin_t", tm)


def _images(v2: bool) -> np.ndarray:
    return np.random.default_rng(0).uniform(-1, 1, (2, *SIZES[v2], 3)).astype(np.float32)


def test_every_model_is_registered_with_its_preprocessing():
    for arch in ALL:
        family = jaxpull.core.models.get(arch)
        t = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
        assert family.preprocessing == (t.crop_size[0], t.resize_size[0], "bicubic") and not family.max_pools


@pytest.mark.parametrize("arch", ALL)
def test_torch_layout_gives_every_parameter_shape(arch):
    """torchvision's state_dict (meta device) maps onto exactly the Flax module's parameters."""
    with torch.device("meta"):
        tm = torchvision.models.get_model(arch, weights=None)
    assert swin.torch_config(tm) == {}
    check_layout_shapes(arch, tm)


def test_window_constants_are_torchvisions():
    from torchvision.models.swin_transformer import ShiftedWindowAttentionV2

    m = ShiftedWindowAttentionV2(8, [3, 5], [1, 2], 2)
    np.testing.assert_array_equal(swin.relative_position_index((3, 5)), m.relative_position_index.numpy())
    np.testing.assert_array_equal(swin.relative_coords_table((3, 5)), m.relative_coords_table.numpy())


@pytest.fixture(scope="module", params=[False, True], ids=["v1", "v2"])
def small(request):
    return request.param, *_small(request.param)


ATTENTION = {"value_only": dict(attention="value_only"), "tempered": dict(attention_temperature=0.5)}


@functools.lru_cache(maxsize=2)
def parity(v2: bool) -> Parity:
    """Both presets, the vanilla gradient and the two attention variants of the semantic preset
    in one compiled function (V1: and the excitation ascent), measured once for the tests below
    (called inside them: compiled at their codegen effort)."""
    methods = {**PARITY_METHODS, **{k: dict(rules="semantic", **kw) for k, kw in ATTENTION.items()}}
    return measure_parity(*_small(v2), _images(v2), TARGETS, methods, ascent_labels=0 if v2 else 1)


def test_small_model_config_is_recorded(small):
    v2, tm, model = small
    assert dict(model.spec.config) == dict(
        patch_size=(4, 4), embed_dim=16, depths=(1, 2), num_heads=(1, 2), window_size=(4, 4), mlp_ratio=4.0
    )


def test_matches_torch(small):
    """Logits, both presets' pullbacks, vanilla gradients, an ascent; the rules act."""
    v2, tm, model = small
    x = _images(v2)
    p = parity(v2)
    assert_parity(p, PARITY_METHODS, ascent_rel=1e-3)
    print(f"{'v2' if v2 else 'v1'} parity errors: {p.errors}")
    if v2:  # see the module docstring: 2 steps of the first preset's ascent
        a = resolve_ascent()
        got = np.asarray(jaxpull.ascent(model, x, TARGETS[:, :1], steps=2)) - x[:, None]
        ref = (
            R.ascent(
                R.gated(tm),
                torch.from_numpy(x),
                torch.from_numpy(TARGETS[:, :1]),
                steps=2,
                alpha=a.alpha,
                eps=a.eps,
            )
            - torch.from_numpy(x)[:, None]
        )
        assert_maps_close(got, ref)
        print("v2 2-step ascent errors:", map_errors(got, ref))
    for rules in ("excitation", "semantic"):
        cos, _ = map_errors(p.maps[rules], p.maps["vanilla"])
        assert cos < 0.99, f"{rules}: the rules barely change the gradient (cosine {cos:.4f})"


@pytest.mark.parametrize("attention", ATTENTION)
def test_attention_rules_match_the_reference(small, attention):
    """The attention rules inside torchvision's functional window attention, against the
    reference's Swin patch (the semantic preset's other rules alike); each changes the map."""
    v2 = small[0]
    p = parity(v2)
    assert_parity(p, [attention])
    print(f"{'v2' if v2 else 'v1'} {attention} {ATTENTION[attention]}: {p.errors[attention]}")
    cos, _ = map_errors(p.maps[attention], p.maps["semantic"])  # the preset: tempered at t = 1, the plain attention
    assert cos < 0.99, f"the {attention} rule barely changes the map (cosine {cos:.4f})"


def test_image_smaller_than_a_patch_is_refused(small):
    v2, tm, model = small
    with pytest.raises(ValueError, match="smaller than one 4x4 patch"):
        model(np.zeros((1, 3, 8, 3), np.float32))
