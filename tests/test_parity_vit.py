"""Parity with PyTorch for the Vision Transformer (vit_b_16, vit_b_32, vit_l_16, vit_l_32, vit_h_14).

Every builder gets the shape check: its torchvision state_dict on the meta device (no weights in
memory) goes through ``torch_layout`` and must give exactly the Flax module's parameters, with
their shapes (and vit_h_14 once more at 518 px, the size of its DEFAULT weights).

Numeric parity runs on a small torchvision ``VisionTransformer`` (32 px images, 8 px patches, two
layers, two heads, width 32, MLP 64), converted with the same code as the named ones (its sizes
go into ``ModelSpec.config``): every parameter torchvision initialises trivially (LayerNorm
affines, biases, class token, the zero head) randomised, so that logits are of order 1 and every
rule acts. ``check_parity`` (helpers.py) compares logits, both presets' pullbacks (GELU gate t 1,
LayerNorm statistics detached, tempered attention t 1), float64 vanilla gradients and one ascent;
then the value-only attention rule and the tempered rule at t = 0.5 against the torch reference
(``R.RuledMultiheadAttention``), each shown to change the map.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
import torch
import torchvision
from flax import traverse_util
from torchvision.models.vision_transformer import VisionTransformer

import jaxpull
import jaxpull_convert
from conftest import images
from helpers import PARITY_METHODS, check_layout_shapes, check_parity, map_errors, stand_in
from jaxpull.core.model import ModelSpec, param_shapes
from jaxpull.core.models import vit

# less codegen effort: each function runs once or twice, on small inputs (conftest.py)
pytestmark = pytest.mark.quick_compile

ARCHS = ["vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14"]
SMALL = dict(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)
TARGETS = np.array([[1, 7], [3, 5]])


def _shapes(tree) -> dict:
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def test_every_model_is_registered():
    assert set(ARCHS) <= set(jaxpull.core.models.ARCHITECTURES)
    assert jaxpull.core.models.get("vit_h_14").preprocessing == jaxpull.core.preprocessing.Preprocessing(
        518, 518, "bicubic"
    )
    assert jaxpull.core.models.get("vit_l_16").preprocessing.resize_size == 242


@pytest.mark.parametrize("arch", ARCHS)
def test_torch_layout_gives_every_parameter_shape(arch):
    """torchvision's full-size state_dict (meta device) maps onto exactly the Flax parameters."""
    with torch.device("meta"):
        tm = torchvision.models.get_model(arch, weights=None)
    assert vit.torch_config(tm) == {}
    check_layout_shapes(arch, tm)


def test_vit_h_14_at_the_size_of_its_default_weights():
    """The SWAG E2E weights are for 518 px: that size is read off the module and off the state_dict."""
    with torch.device("meta"):
        tm = torchvision.models.vit_h_14(image_size=518)
    config = vit.torch_config(tm)
    assert config == {"image_size": 518}
    assert vit.state_dict_config("vit_h_14", {k: stand_in(v.shape) for k, v in tm.state_dict().items()}) == config
    check_layout_shapes("vit_h_14", tm, **config)
    spec = ModelSpec("vit_h_14", config=tuple(config.items()))
    assert _shapes(param_shapes(spec))["encoder/pos_embedding"] == (1, 37 * 37 + 1, 1280)


def _randomize(tm: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Random LayerNorm affines, biases, class token and head (torchvision: ones, zeros, ~1e-6)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tm.named_parameters():
            if p.ndim == 1 or name == "class_token":
                base = 1.0 if name.endswith("weight") else 0.0  # the 1-D weights are the LayerNorms'
                p.copy_(base + 0.3 * torch.randn(p.shape, generator=g))
        for m in tm.heads:
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0.0, 1.0, generator=g)
    return tm.eval()


@functools.lru_cache(maxsize=2)
def small(representation_size=None):
    """(torch model, converted jaxpull model): the small ViT, randomised."""
    torch.manual_seed(0)
    tm = _randomize(VisionTransformer(**SMALL, num_classes=10, representation_size=representation_size))
    return tm, jaxpull_convert.from_torch_module("vit_b_16", tm)


def test_small_vit_matches_torch():
    """Logits, both presets' pullbacks, float64 vanilla gradients and one ascent; then the
    value-only rule and the tempered rule at t = 0.5, each against the torch reference."""
    tm, model = small()
    assert dict(model.spec.config) == SMALL
    x = images(2, 32)
    variants = {"value_only": dict(attention="value_only"), "t_0.5": dict(attention_temperature=0.5)}
    methods = {**PARITY_METHODS, **{k: dict(rules="semantic", **kw) for k, kw in variants.items()}}
    p = check_parity(tm, model, x, TARGETS, methods, ascent_rel=1e-3)  # one compiled function for all five
    print({k: v if isinstance(v, float) else tuple(f"{e:.2e}" for e in v) for k, v in p.errors.items()})

    # The rules act: each changes the map (at t = 1 the tempered attention is the plain gradient,
    # so the preset differs from the vanilla gradient by the GELU and LayerNorm rules).
    for other in ("vanilla", "value_only", "t_0.5"):
        assert map_errors(p.maps[other], p.maps["semantic"])[1] > 0.05, other


def test_representation_size_head():
    """``heads.pre_logits`` -> tanh -> ``heads.head`` (torchvision's ``representation_size``)."""
    tm, model = small(representation_size=16)
    assert dict(model.spec.config)["representation_size"] == 16
    check_parity(tm, model, images(2, 32, seed=1), TARGETS, {"semantic": dict(rules="semantic")})


def test_legacy_mlp_keys_convert_alike():
    """torchvision < 0.14 checkpoints name the MLP's layers ``mlp.linear_1`` / ``mlp.linear_2``."""
    tm, model = small()
    tensors = {
        k.replace("mlp.0.", "mlp.linear_1.").replace("mlp.3.", "mlp.linear_2."): v.numpy()
        for k, v in tm.state_dict().items()
    }
    assert any("linear_2" in k for k in tensors)
    legacy = jaxpull_convert.from_state_dict("vit_b_16", tensors, config=dict(model.spec.config))
    flat, want = traverse_util.flatten_dict(legacy.params), traverse_util.flatten_dict(model.params)
    assert flat.keys() == want.keys() and all(np.array_equal(flat[k], want[k]) for k in want)


def test_wrong_image_size_is_one_clear_error():
    _, model = small()
    with pytest.raises(ValueError, match=r"takes 32x32 images .* got 48x48: resize the images to 32x32"):
        model(images(1, 48))
    with pytest.raises(ValueError, match="got 32x40"):
        jaxpull.pullback(model, np.zeros((1, 32, 40, 3), np.float32), [1])
    with pytest.raises(ValueError, match="image_size 36 is not a multiple of patch_size 8"):
        ModelSpec("vit_b_16", num_classes=10, config=tuple({**SMALL, "image_size": 36}.items())).module().init(
            jax.random.key(0), np.zeros((1, 36, 36, 3), np.float32), jaxpull.core.settings.VANILLA
        )


def test_unsupported_torch_models_are_refused():
    conv_stem = [torchvision.models.vision_transformer.ConvStemConfig(8, 3, 2)] * 3
    with torch.device("meta"):
        stem = VisionTransformer(**SMALL, conv_stem_configs=conv_stem)
        eps = VisionTransformer(**SMALL, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-5))
    with pytest.raises(ValueError, match="convolutional stem"):
        vit.torch_config(stem)
    with pytest.raises(ValueError, match="LayerNorm eps"):
        vit.torch_config(eps)
    assert vit.state_dict_config("vit_b_16", {"encoder.pos_embedding": np.zeros((1, 197, 8))}) == {}
    with pytest.raises(ValueError, match="not a square grid"):
        vit.state_dict_config("vit_b_16", {"encoder.pos_embedding": np.zeros((1, 190, 8))})
