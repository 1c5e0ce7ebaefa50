"""Parity with timm for PVT-v2 (timm/pvt_v2_b0 ... b5, timm/pvt_v2_b2_li), the paper's transformer.

Every size gets the shape check: timm's full-size model on torch's meta device (no weights in
memory) goes through ``torch_layout`` and must give exactly the Flax module's parameters, with
their shapes.

Numeric parity runs on small timm ``PyramidVisionTransformerV2`` instances (one block a stage,
widths 16-64, timm's spatial reductions 8, 4, 2, 1, 64x64 images: every stage attends to 2x2
reduced keys and values) and on the linear variant (7x7 pooled keys and values, GELU in the
key/value path, ReLU in the MLP), converted with the same code as the named ones (their sizes go
into ``ModelSpec.config``). Every parameter timm initialises trivially (LayerNorm affines, every
bias) is randomised, and the linear layers drawn at variance 1 / fan_in, so that logits and
attention scores are of order 1 and every rule acts.
``check_parity`` (helpers.py) compares logits, the presets' pullbacks (GELU gate t 1, LayerNorm
statistics detached, value-only attention; the linear variant's ReLU gated), float64 vanilla
gradients and one ascent against timm's module under ``torch_reference.gated``, and on the
spatial-reduction model the attention rule's other modes (tempered at t = 0.5, plain), each shown
to change the map. Then the semantic preset against the paper's rules written out per attention
kind: value-only on PVT-v2, tempered at t = 1 on torchvision's ViT.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import timm
import torch
from timm.models.pvt_v2 import PyramidVisionTransformerV2

import jaxpull
import jaxpull_convert
from conftest import images
from helpers import PARITY_METHODS, assert_logits_close, check_layout_shapes, check_parity, map_errors
from jaxpull.core import models
from jaxpull.core.models import pvt_v2
from jaxpull.core.rules import GELU, Attention, LayerNorm, Rules
from jaxpull.core.settings import VANILLA, resolve
from jaxpull_convert import torch_reference as R

# less codegen effort: each function runs once or twice, on small inputs (conftest.py)
pytestmark = pytest.mark.quick_compile

# named as jaxpull names them (the test ids too: tests/test_parity.py checks that every name has a test)
ARCHS = [f"timm/pvt_v2_{size}" for size in ("b0", "b1", "b2", "b3", "b4", "b5", "b2_li")]
SMALL = dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), mlp_ratios=(2, 2, 2, 2))
TARGETS = np.array([[1, 7], [3, 5]])
SIZE = 64


def test_every_model_is_registered():
    assert set(ARCHS) == {a for a in models.ARCHITECTURES if a.startswith("timm/pvt")}
    for arch in ARCHS:
        entry = models.get(arch)
        assert entry.preprocessing == jaxpull.core.preprocessing.Preprocessing(224, 248, "bicubic")
        assert not entry.max_pools


@pytest.mark.parametrize("arch", ARCHS)
def test_torch_layout_gives_every_parameter_shape(arch):
    """timm's full-size state_dict (meta device) maps onto exactly the Flax parameters."""
    with torch.device("meta"):
        tm = timm.create_model(arch.removeprefix("timm/"))
    assert pvt_v2.torch_config(tm) == {}
    check_layout_shapes(arch, tm)


def _randomize(tm: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Random LayerNorm affines and biases (timm: ones and zeros) and linear weights of variance
    1 / fan_in (timm: std 0.02, which leaves the attention scores near zero and its weights uniform,
    where the attention rules would hardly differ)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tm.named_parameters():
            if p.ndim == 1:
                base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                p.copy_(base + 0.3 * torch.randn(p.shape, generator=g))
        for m in tm.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0.0, m.in_features**-0.5, generator=g)
    return tm.eval()


@functools.lru_cache(maxsize=2)
def small(linear: bool = False):
    """(timm model, converted jaxpull model): a small PVT-v2 (or its linear variant), randomised."""
    torch.manual_seed(0)
    tm = _randomize(PyramidVisionTransformerV2(**SMALL, linear=linear, num_classes=10))
    return tm, jaxpull_convert.from_torch_module("timm/pvt_v2_b2_li" if linear else "timm/pvt_v2_b0", tm)


# The methods compared with timm, the first one's ascent too. Without a ReLU (the spatial-reduction
# models) the two presets are the same rules (test_presets_agree_without_a_relu): "semantic" stands
# for both, and the attention rule's other modes run instead; the linear variant has a ReLU, so
# both presets run there.
SR_METHODS = {
    "semantic": dict(rules="semantic"),
    "vanilla": dict(rules="vanilla"),
    "tempered_0.5": dict(rules="semantic", sr_attention="tempered", sr_attention_temperature=0.5),
    "plain": dict(rules="semantic", sr_attention="plain"),
}
METHODS = {False: SR_METHODS, True: {"excitation": dict(rules="excitation"), **PARITY_METHODS}}


def test_presets_agree_without_a_relu():
    """Every rule a spatial-reduction PVT-v2 uses is the same in both presets (they differ in the ReLU)."""
    excitation, semantic = resolve("excitation"), resolve("semantic")
    for field in ("gelu", "layer_norm", "sr_attention"):
        assert getattr(excitation, field) == getattr(semantic, field), field
    assert excitation.relu != semantic.relu


@pytest.mark.parametrize("linear", [False, True], ids=["sr", "linear"])
def test_small_pvt_parity_with_timm(linear):
    """Logits, the presets' pullbacks, float64 vanilla gradients and the first method's ascent
    (semantic: no L2 ball; excitation: eps 100); on the spatial-reduction model also the tempered
    attention rule at t = 0.5 and the plain one, each against the torch reference."""
    tm, model = small(linear)
    assert dict(model.spec.config)["linear"] is linear
    methods = METHODS[linear]
    p = check_parity(tm, model, images(2, SIZE), TARGETS, methods, ascent_rel=1e-3)  # one compiled function for all
    print({k: v if isinstance(v, float) else tuple(f"{e:.2e}" for e in v) for k, v in p.errors.items()})

    # The rules act: each changes the map (the value-only attention, GELU and LayerNorm rules
    # separate the preset from the vanilla gradient; the attention's modes from each other; on the
    # linear variant the ReLU's gate, sigmoid t 0.3 against Phi t 0.6, separates the presets).
    for other in set(methods) - {"semantic"}:
        assert map_errors(p.maps[other], p.maps["semantic"])[1] > (1e-3 if other == "excitation" else 0.05), other


def test_semantic_preset_treats_each_attention_kind_as_the_papers_code():
    """One preset, two attention kinds: ``"semantic"`` holds PVT-v2's attention weights constant
    (the paper's code's PVT rule) while torchvision ViT's multi-head attention keeps the tempered
    rule at t = 1 (the paper's ``nn.MultiheadAttention`` rule). The references are built from those
    rules written out per module kind, not from the preset: GELU Phi(z / 1), LayerNorm statistics
    detached, ``nn.MultiheadAttention`` tempered at 1, timm's ``pvt_v2.Attention`` value-only.
    Each model's attention under the other kind's rule (PVT-v2's tempered at 1, that is plain;
    ViT's value-only) gives another map, so the preset's choice per kind is what the test sees."""
    from test_parity_vit import small as small_vit

    papers = Rules(
        gelu=GELU(temperature=1.0),
        layer_norm=LayerNorm("detached"),
        attention=Attention("tempered", 1.0),
        sr_attention=Attention("value_only"),
    )
    semantic = resolve("semantic")
    for field in ("gelu", "layer_norm", "attention", "sr_attention"):
        assert getattr(semantic, field) == getattr(papers, field), field
    labels = np.concatenate([TARGETS, TARGETS[:, ::-1]], axis=1)  # (N, 4) as check_parity's: its compiled function
    cases = {
        "pvt": (small(), images(2, SIZE), SR_METHODS, "plain", R.RuledPVTAttention, ("value_only", 1.0)),
        "vit": (
            small_vit(),
            images(2, 32),
            {"semantic": dict(rules="semantic"), "value_only": dict(rules="semantic", attention="value_only")},
            "value_only",
            R.RuledMultiheadAttention,
            ("tempered", 1.0),
        ),
    }
    for kind, ((tm, model), x, methods, other, module, rule) in cases.items():
        reference = R.gated(tm, papers)
        assert {(m.attention, m.t) for m in reference.modules() if isinstance(m, module)} == {rule}, kind
        ref = R.pullback(reference, torch.from_numpy(x), torch.from_numpy(labels))
        got = jaxpull.compare(model, x, labels, methods).maps
        cos, rel = map_errors(got["semantic"], ref)
        assert cos > 0.9999 and rel < 1e-3, (kind, cos, rel)
        assert map_errors(got[other], ref)[1] > 0.05, kind


def test_qkv_bias_false_converts():
    """timm's ``qkv_bias=False`` (no query and key-value biases): read off the module and off the state_dict."""
    torch.manual_seed(0)
    tm = _randomize(PyramidVisionTransformerV2(**SMALL, qkv_bias=False, num_classes=10))
    model = jaxpull_convert.from_torch_module("timm/pvt_v2_b0", tm)
    assert dict(model.spec.config)["qkv_bias"] is False
    assert pvt_v2.state_dict_config("timm/pvt_v2_b0", {k: v.numpy() for k, v in tm.state_dict().items()}) == {
        "qkv_bias": False
    }
    x = images(1, SIZE, seed=2)
    with torch.no_grad():
        ref = tm(R.normalize(torch.from_numpy(x)))
    assert_logits_close(model(x), ref)


def test_too_small_images_are_one_clear_error():
    _, model = small()
    assert pvt_v2.min_image_size((8, 4, 2, 1)) == 29 and pvt_v2.min_image_size((8, 4, 2, 1), linear=True) == 1
    with pytest.raises(ValueError, match=r"a 28x40 image is too small .* at least 29x29 pixels"):
        model.apply(np.zeros((1, 28, 40, 3), np.float32), VANILLA)


def test_unsupported_timm_modules_are_refused():
    with torch.device("meta"):
        pooled = timm.create_model("pvt_v2_b0", global_pool="")
        features = timm.create_model("pvt_v2_b0", num_classes=0)
        grey = timm.create_model("pvt_v2_b0", in_chans=1)
        eps = PyramidVisionTransformerV2(**SMALL, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-5))
    for module, message in (
        (pooled, "global_pool=''"),
        (features, "no classifier"),
        (grey, "1 input channels"),
        (eps, "LayerNorms have eps"),
    ):
        with pytest.raises(ValueError, match=message):
            pvt_v2.torch_config(module)
