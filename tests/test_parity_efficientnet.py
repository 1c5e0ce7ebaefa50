"""Parity with PyTorch for torchvision's EfficientNet (b0-b7) and EfficientNetV2 (s, m, l).

Every named model gets the shape check: its torchvision state_dict, built on the meta device (no
weights in memory), goes through ``torch_layout`` and must give every parameter of the Flax
module, with its shape, and no missing or unused key; and ``torch_config`` must recognise it
({}: its stages, head width and BatchNorm epsilon are the named architecture's).

Numerical parity (``helpers.check_parity``: logits, both presets' pullbacks, float64 vanilla
gradients, one ascent) runs on a small torchvision ``EfficientNet`` of each kind, built from a
short ``MBConvConfig`` / ``FusedMBConvConfig`` list and converted with ``from_torch_module`` (so
through ``torch_config``): every block kind (MBConv with and without the expansion convolution,
FusedMBConv with and without it), stride 1 and 2, kernels 3 and 5, residuals, SE blocks, both
BatchNorm epsilons. Random BatchNorm statistics and random biases (torchvision zero-initialises
them) make the logits O(1).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.efficientnet import EfficientNet, FusedMBConvConfig, MBConvConfig

import jaxpull
import jaxpull_convert
from conftest import images, randomize_batchnorm
from helpers import REL_ERR_MAX, assert_logits_close, check_layout_shapes, check_parity, map_errors
from jaxpull.core.models import efficientnet
from jaxpull.files import model_file
from jaxpull_convert import torch_reference as R

# less codegen effort: each function runs once or twice, on small inputs (conftest.py)
pytestmark = pytest.mark.quick_compile

V1 = [f"efficientnet_b{i}" for i in range(8)]
V2 = ["efficientnet_v2_s", "efficientnet_v2_m", "efficientnet_v2_l"]
TARGETS = np.array([[1, 7], [3, 5]])


def test_v2_l_records_its_own_normalisation():
    from jaxpull_convert import sources

    assert sources.input_mean("efficientnet_v2_l") == (0.5, 0.5, 0.5) == sources.input_std("efficientnet_v2_l")
    assert sources.input_mean("efficientnet_v2_m") == jaxpull.core.layers.IMAGENET_MEAN


def test_every_model_is_registered_with_its_preprocessing():
    for arch in V1 + V2:
        assert jaxpull.core.models.get(arch).preprocessing == efficientnet.PREPROCESSING[arch]
    assert jaxpull.core.models.get("efficientnet_b7").preprocessing.crop_size == 600
    assert jaxpull.core.models.get("efficientnet_v2_s").preprocessing.interpolation == "bilinear"


@pytest.mark.parametrize("arch", V1 + V2)
def test_torch_layout_gives_every_parameter_shape(arch):
    """torchvision's state_dict (meta device) maps onto exactly the Flax module's parameters."""
    with torch.device("meta"):
        tm = torchvision.models.get_model(arch, weights=None)
    assert efficientnet.torch_config(tm) == {}
    check_layout_shapes(arch, tm)


def _randomized(tm: torch.nn.Module) -> torch.nn.Module:
    """``tm`` in eval mode with random BatchNorm statistics and random biases (SE, classifier)."""
    randomize_batchnorm(tm)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in tm.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.bias is not None:
                m.bias.copy_(0.4 * torch.rand(m.bias.shape, generator=g) - 0.2)
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(4.0)
    return tm.eval()


@functools.lru_cache(maxsize=1)
def tiny_v1():
    """b0's code path at small sizes: expansion 1 (3x3, residual), then a 5x5 stage: stride 2 and
    expansion 6, then a residual block; default BatchNorm (eps 1e-5, as b0-b4)."""
    torch.manual_seed(0)
    setting = [MBConvConfig(1, 3, 1, 16, 16, 1), MBConvConfig(6, 5, 2, 16, 24, 2)]
    tm = _randomized(EfficientNet(setting, dropout=0.2, num_classes=10))
    return tm, jaxpull_convert.from_torch_module("efficientnet_b0", tm)


@functools.lru_cache(maxsize=1)
def tiny_v2():
    """V2's code path at small sizes: FusedMBConv without (residual) and with expansion (stride
    2), MBConv with SE (stride 2, then residual), a 96-wide head; BatchNorm eps 1e-3 (as V2)."""
    torch.manual_seed(0)
    setting = [
        FusedMBConvConfig(1, 3, 1, 16, 16, 2),
        FusedMBConvConfig(4, 3, 2, 16, 24, 1),
        MBConvConfig(4, 3, 2, 24, 32, 2),
    ]
    tm = EfficientNet(
        setting,
        dropout=0.2,
        num_classes=10,
        last_channel=96,
        norm_layer=functools.partial(torch.nn.BatchNorm2d, eps=1e-3),
    )
    return _randomized(tm), jaxpull_convert.from_torch_module("efficientnet_v2_s", tm)


def test_small_models_carry_their_sizes():
    _, v1 = tiny_v1()
    _, v2 = tiny_v2()
    config = dict(v1.spec.config)
    assert config["bn_eps"] == 1e-5 and config["last_channel"] is None
    assert [s[0] for s in config["stages"]] == ["MBConv"] * 2
    config = dict(v2.spec.config)
    assert config["bn_eps"] == 1e-3 and config["last_channel"] == 96
    assert [s[0] for s in config["stages"]] == ["FusedMBConv", "FusedMBConv", "MBConv"]
    # what torchvision built: every block kind of each family is present
    params = v2.params
    assert set(params["features_1_0"]) == {"conv"} and set(params["features_2_0"]) == {"expand", "project"}
    assert set(params["features_3_1"]) == {"expand", "depthwise", "se", "project"}
    assert set(v1.params["features_1_0"]) == {"depthwise", "se", "project"}


@pytest.mark.parametrize("tiny", [tiny_v1, tiny_v2], ids=["efficientnet", "efficientnet_v2"])
def test_matches_torch(tiny):
    tm, model = tiny()
    x = images(2, 48)
    parity = check_parity(tm, model, x, TARGETS, ascent_rel=REL_ERR_MAX)
    print(tiny.__name__, parity.errors)
    # the SiLU rule acts: each preset's pullback differs from the vanilla gradient
    for rules in ("excitation", "semantic"):
        cos, rel = map_errors(parity.maps[rules], parity.maps["vanilla"])
        print(rules, "vs vanilla: cosine", cos, "rel diff", rel)
        assert cos < 0.99 and rel > 0.1, (rules, cos, rel)


def test_saved_small_model_loads_with_its_sizes_at_any_input_size(tmp_path):
    tm, model = tiny_v2()
    model_file.save(model, tmp_path / "tiny.safetensors")
    loaded = model_file.load(tmp_path / "tiny.safetensors")
    assert loaded.spec.config == model.spec.config
    x = images(1, 37)  # odd sizes through every stride-2 convolution
    with torch.no_grad():
        ref = tm(R.normalize(torch.from_numpy(x)))
    assert_logits_close(loaded(x), ref)


def test_bad_input():
    with pytest.raises(ValueError, match="expected a torchvision EfficientNet, got ResNet"):
        efficientnet.torch_config(torchvision.models.resnet18())
    with pytest.raises(ValueError, match="invalid EfficientNet stage"):
        efficientnet.efficientnet([("Bottleneck", 1, 3, 1, 16, 16, 1)])
    with pytest.raises(ValueError, match="at least one stage"):
        efficientnet.efficientnet([])
