"""Parity with timm (1.0) for the timm families jaxpull converts: ResNet (and ResNet-D), ViT, DeiT
(and its distilled models), ConvNeXt, EfficientNet-B0 and Swin.

Every registered ``timm/<name>`` gets the shape check: timm's own model built on the meta device
(no weights in memory) reads ``{}`` from its family's ``torch_config``, and its state_dict goes
through ``torch_layout`` onto exactly the Flax module's parameters and shapes. Its preprocessing
and normalisation are those of the name's default ``pretrained_cfg``.

Numeric parity runs on small timm modules (built with timm's own classes and options, converted
through ``torch_config``), on random weights that make every parameter matter (BatchNorm
statistics and affines, LayerNorm affines, biases, layer scales, tokens, position bias tables,
unit-gain linear layers, heads of O(1) logits): ``measure_parity`` compares the logits, the
pullbacks of the presets against ``torch_reference.gated`` of timm's module, the float64 vanilla
gradient, and one ascent. On the families without ReLU or max-pool (ViT, DeiT, ConvNeXt,
EfficientNet, Swin) the two presets are one rule set (asserted: the same GELU, SiLU, LayerNorm
and attention rules), so one of them is compiled; on ResNet-D both are. The attention rules
other than the presets' (value-only, tempered at t = 0.5) are checked on DeiT and Swin against the
reference's timm patches (``jaxpull_convert.timm_reference``), each shown to change the map.
"""

from __future__ import annotations

import functools
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from timm.models._efficientnet_builder import decode_arch_def
from timm.models.convnext import ConvNeXt
from timm.models.efficientnet import EfficientNet
from timm.models.resnet import BasicBlock, ResNet
from timm.models.swin_transformer import SwinTransformer

import jaxpull
import jaxpull.core.models
import jaxpull_convert
from helpers import assert_parity, check_layout_shapes, map_errors, measure_parity
from jaxpull.core.models import convnext, efficientnet, resnet, swin, vit
from jaxpull.core.settings import resolve
from jaxpull_convert import torch_reference as R
from jaxpull_convert.testing import random_images as images, randomize_batchnorm

# less codegen effort: each function runs once or twice, on small inputs (conftest.py)
pytestmark = pytest.mark.quick_compile

FAMILIES = {resnet: "resnet", vit: "vit", convnext: "convnext", efficientnet: "efficientnet", swin: "swin"}
TIMM = sorted(a for a in jaxpull.core.models.ARCHITECTURES if a.startswith("timm/"))
TARGETS = np.array([[1, 7], [3, 5]])


def test_every_timm_name_is_registered():
    want = {f"timm/resnet{d}{v}" for d in (18, 34, 50, 101, 152) for v in ("", "d")}
    want |= {f"timm/vit_{s}_patch16_224" for s in ("tiny", "small", "base", "large")}
    want |= {f"timm/deit_{s}{d}_patch16_224" for s in ("tiny", "small", "base") for d in ("", "_distilled")}
    want |= {f"timm/convnext_{s}" for s in ("tiny", "small", "base", "large")} | {"timm/efficientnet_b0"}
    want |= {f"timm/swin_{s}_patch4_window7_224" for s in ("tiny", "small", "base")}
    want |= {f"timm/pvt_v2_b{i}" for i in range(6)} | {"timm/pvt_v2_b2_li"}  # tests/test_parity_pvt_v2.py
    assert set(TIMM) == want


@pytest.mark.parametrize("arch", TIMM)
def test_preprocessing_is_the_default_pretrained_cfg(arch):
    """crop = input size, resize = floor(crop / crop_pct), the interpolation, mean and std of the
    name's default weights (timm's pretrained_cfg, read from timm's registry: no download)."""
    cfg = timm.models.get_pretrained_cfg(arch[len("timm/") :]).to_dict()
    entry = jaxpull.core.models.get(arch)
    crop = cfg["input_size"][-1]
    assert entry.preprocessing == (crop, math.floor(crop / cfg["crop_pct"]), cfg["interpolation"])
    assert (entry.input_mean, entry.input_std) == (tuple(cfg["mean"]), tuple(cfg["std"]))


@pytest.mark.parametrize("arch", TIMM)
def test_torch_layout_gives_every_parameter_shape(arch):
    """timm's full-size model (meta device) maps onto exactly the Flax parameters."""
    with torch.device("meta"):
        tm = timm.create_model(arch[len("timm/") :], pretrained=False)
    assert jaxpull.core.models.get(arch).torch_config(tm) == {}
    check_layout_shapes(arch, tm)


@pytest.mark.parametrize("shape", [(19, 5), (4, 4), (1, 3), (10, 11)])
def test_ceil_mode_average_pool_is_torchs(shape):
    """ResNet-D's shortcut pool: ``nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)``."""
    from jaxpull.core.layers import avg_pool_ceil

    x = np.random.default_rng(0).normal(size=(2, *shape, 3)).astype(np.float32)
    pool = torch.nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)
    ref = pool(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(avg_pool_ceil(x, 2, 2)), ref, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------
# Small random timm models
# --------------------------------------------------------------------------------------


def randomize(tm: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter that timm initialises trivially made to matter: BatchNorm statistics and
    affines, LayerNorm affines near (1, 0), biases, layer scales (``gamma``) near 1, tokens,
    relative position bias tables O(1), linear layers of unit gain (logits of order 1)."""
    randomize_batchnorm(tm, seed)
    g = torch.Generator().manual_seed(seed)
    bn = {f"{n}.{k}" for n, m in tm.named_modules() if isinstance(m, torch.nn.BatchNorm2d) for k in ("weight", "bias")}
    with torch.no_grad():
        for name, p in tm.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name in bn:
                continue
            if name.endswith("relative_position_bias_table") or name.endswith("_token"):
                p.copy_(r)
            elif name.endswith("gamma") or (p.ndim == 1 and name.endswith("weight")):
                p.copy_(1 + 0.3 * r)
            elif p.ndim == 1:
                p.copy_(0.3 * r)
            elif p.ndim == 2 and name != "pos_embed":
                p.copy_(r / math.sqrt(p.shape[1]))
    return tm.eval()


def _timm_vit(distilled: bool):
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
    return timm.create_model("deit_tiny_distilled_patch16_224" if distilled else "vit_base_patch16_224", **kw)


# name -> (the timm name it converts under, a builder of the small timm module, its image side);
# each converts under that name with its own sizes (torch_config -> ModelSpec.config)
SMALL = {
    # deep stem, average-pool shortcuts (layer1's without the pool: stride 1, 16 -> 8 channels);
    # 75 px: the ceil-mode pools meet odd sides (19, 5)
    "resnet_d": (
        "timm/resnet50d",
        lambda: ResNet(
            BasicBlock, (1, 1, 1, 1), channels=(8, 16, 24, 32), stem_width=8, stem_type="deep", avg_down=True
        ),
        75,
    ),
    "resnet": ("timm/resnet18", lambda: ResNet(BasicBlock, (1, 1, 1, 1), channels=(8, 16, 24, 32)), 72),
    "vit": ("timm/vit_base_patch16_224", lambda: _timm_vit(False), 32),
    "deit_distilled": ("timm/deit_tiny_distilled_patch16_224", lambda: _timm_vit(True), 32),
    "convnext": ("timm/convnext_tiny", lambda: ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)), 32),
    # a depthwise-separable first stage with its skip, an inverted residual stage of two blocks
    "efficientnet": (
        "timm/efficientnet_b0",
        lambda: EfficientNet(
            decode_arch_def([["ds_r1_k3_s1_e1_c8_se0.25"], ["ir_r2_k5_s2_e6_c16_se0.25"]]),
            num_features=48,
            stem_size=8,
            act_layer=torch.nn.SiLU,
        ),
        40,
    ),
    # 40 px: stage 1 10x10 (window 4, shift 2), stage 2 5x5 (window 4, shift 2, padded to 8 after
    # the roll: torchvision's pad-then-roll differs here), stage 3 3x3 (window 3, no shift)
    "swin": (
        "timm/swin_tiny_patch4_window7_224",
        lambda: SwinTransformer(img_size=40, embed_dim=16, depths=(1, 2, 1), num_heads=(1, 2, 2), window_size=4),
        40,
    ),
}


@functools.lru_cache(maxsize=2)
def small(name: str):
    """(small random timm module in eval mode, its conversion, its images)."""
    arch, build, side = SMALL[name]
    torch.manual_seed(0)
    tm = build()
    tm.reset_classifier(10)
    randomize(tm)
    return tm, jaxpull_convert.from_torch_module(arch, tm), images(2, side)


def _norm(model):
    """The torch side's normalisation: the converted model's (ViT: mean = std = 0.5)."""
    return lambda x: R.normalize(x, model.spec.input_mean, model.spec.input_std)


# The layer kinds of each family's small model, whose rules are the presets' only difference.
RULED = {
    "deit_distilled": ("gelu", "layer_norm", "attention"),
    "convnext": ("gelu", "layer_norm"),
    "efficientnet": ("silu",),
    "swin": ("gelu", "layer_norm", "attention"),
}
ATTENTION = {"value_only": dict(rules="semantic", attention="value_only"), "t_0.5": dict(attention_temperature=0.5)}
# which of them each small model checks: both on DeiT (timm's Attention), the tempered one on Swin
# (timm's WindowAttention; at t = 1 its rule is checked by the presets)
ATTENTION_CHECKED = {"deit_distilled": ("value_only", "t_0.5"), "swin": ("t_0.5",)}


def parity_methods(name: str) -> dict:
    """The presets (one where they are one rule set on this model), the vanilla gradient, and on
    DeiT and Swin the other attention rules."""
    if name not in RULED:
        return {
            "excitation": dict(rules="excitation"),
            "semantic": dict(rules="semantic"),
            "vanilla": dict(rules="vanilla"),
        }
    a, b = resolve("excitation"), resolve("semantic")
    assert all(getattr(a, f) == getattr(b, f) for f in RULED[name]), f"the presets differ on {name}: test both"
    methods = {"excitation": dict(rules="excitation"), "vanilla": dict(rules="vanilla")}
    return {**methods, **{k: ATTENTION[k] for k in ATTENTION_CHECKED.get(name, ())}}


@pytest.mark.parametrize("name", ["resnet_d", "deit_distilled", "convnext", "efficientnet", "swin"])
def test_small_timm_model_matches_timm(name):
    """Logits, the presets' pullbacks, the float64 vanilla gradient and the first preset's ascent
    (5 steps) of a small timm module; the rules change the map."""
    tm, model, x = small(name)
    p = measure_parity(tm, model, x, TARGETS, parity_methods(name), ascent_labels=1, norm=_norm(model))
    print(
        name,
        {
            k: f"{v:.1e}" if isinstance(v, float) else f"1-cos {1 - v[0]:.1e}, rel {v[1]:.1e}"
            for k, v in p.errors.items()
        },
    )
    assert_parity(p)
    for rules in {"excitation", "semantic"} & set(p.maps):
        cos, _ = map_errors(p.maps[rules], p.maps["vanilla"])
        assert cos < 0.99, f"{rules}: the rules barely change the gradient (cosine {cos:.4f})"
    for attention in set(ATTENTION) & set(p.maps):
        cos, _ = map_errors(p.maps[attention], p.maps["excitation"])  # the preset's attention: tempered at t = 1
        assert cos < 0.999, f"the {attention} rule barely changes the map (cosine {cos:.4f})"


@pytest.mark.parametrize("name", ["resnet", "vit"])
def test_small_timm_model_logits_match_timm(name):
    """The plain variants of the families above (7x7 stem; one token, one head): the same
    modules, so their logits check their layouts."""
    tm, model, x = small(name)
    with torch.no_grad():
        ref = tm(_norm(model)(torch.from_numpy(x))).numpy()
    err = np.abs(np.asarray(model(x)) - ref).max()
    assert np.abs(ref).max() > 0.1 and err <= 1e-4 * max(1.0, np.abs(ref).max()), err


# --------------------------------------------------------------------------------------
# What does not convert: one-line errors naming what differs
# --------------------------------------------------------------------------------------

REFUSED = [
    ("seresnet50", {}, "squeeze-excitation"),
    ("resnet50t", {}, "tiered deep stem"),
    ("resnet50", dict(replace_stem_pool=True), "replaced or anti-aliased stem pool"),
    ("resnet50", dict(down_kernel_size=3), "3x3 shortcut"),
    ("vit_base_patch16_224", dict(global_pool="avg"), "global_pool='avg'"),
    ("vit_base_patch16_224", dict(reg_tokens=4), "register tokens"),
    ("vit_base_patch16_224", dict(no_embed_class=True), "no_embed_class=True"),
    ("vit_base_patch16_224", dict(dynamic_img_size=True), "a dynamic image size"),
    ("vit_base_patch16_224", dict(init_values=1e-5), "layer scale"),
    ("vit_base_patch16_224", dict(qk_norm=True), "qk norm"),
    ("vit_base_patch16_224", dict(pre_norm=True), "no patch-embedding bias"),
    ("deit3_small_patch16_224", {}, "no_embed_class=True"),
    ("convnextv2_tiny", {}, "another MLP"),
    ("convnext_tiny", dict(conv_mlp=True), "conv_mlp=True"),
    ("convnext_tiny", dict(head_hidden_size=64), "head hidden layer"),
    ("tf_efficientnet_b0", {}, "TensorFlow 'SAME' padding"),
    ("swin_tiny_patch4_window7_224", dict(always_partition=True), "always_partition"),
    ("swin_tiny_patch4_window7_224", dict(strict_img_size=False), "a dynamic image size"),
    ("swin_tiny_patch4_window7_224", dict(window_size=(7, 7, 7, 5)), "per-stage windows"),
]


@pytest.mark.parametrize(
    "name,kwargs,fragment", REFUSED, ids=[f"{n}-{'-'.join(k) or 'default'}" for n, k, _ in REFUSED]
)
def test_unsupported_timm_options_are_one_line_errors(name, kwargs, fragment):
    """``torch_config`` refuses what its module does not compute, in one line naming it."""
    with torch.device("meta"):
        tm = timm.create_model(name, pretrained=False, **kwargs)
    family = {"res": resnet, "ser": resnet, "vit": vit, "dei": vit, "con": convnext, "tf_": efficientnet, "swi": swin}
    with pytest.raises(ValueError) as e:
        family[name[:3]].torch_config(tm)
    message = str(e.value)
    assert fragment in message and "\n" not in message, message
    assert re.search(r"which jaxpull's \w+ does not compute: \w+", message), message


def test_state_dict_of_another_timm_model_is_one_line_error():
    """A ResNet-D state_dict under a plain ResNet's name, a distilled DeiT's under the plain DeiT's:
    one line naming the keys or the token count that differ, before any model is built."""
    torch.manual_seed(0)
    tensors = {k: v.numpy() for k, v in timm.create_model("resnet18d").state_dict().items()}
    with pytest.raises(jaxpull_convert.ConversionError) as e:
        jaxpull_convert.from_state_dict("timm/resnet18", tensors)
    message = str(e.value)
    assert "\n" not in message and "missing conv1.weight" in message and "unexpected conv1.0.weight" in message
    tensors = {k: v.numpy() for k, v in timm.create_model("deit_tiny_distilled_patch16_224").state_dict().items()}
    with pytest.raises(
        jaxpull_convert.ConversionError, match=r"pos_embed has 198 positions, not a square grid of patches plus 1 token"
    ):
        jaxpull_convert.from_state_dict("timm/deit_tiny_patch16_224", tensors)
    model = jaxpull_convert.from_state_dict("timm/deit_tiny_distilled_patch16_224", tensors)  # its own name: converts
    assert model.spec.config == () and model.num_classes == 1000
    with pytest.raises(ValueError, match="unknown architecture 'timm/resnet51'"):
        jaxpull.core.models.get("timm/resnet51")


def test_image_size_is_read_off_a_timm_state_dict():
    """A timm ViT state_dict at 384 px (its position embeddings): ``image_size`` 384."""
    with torch.device("meta"):
        tm = timm.create_model("vit_base_patch16_384")
    tensors = {
        k: np.zeros(v.shape, np.float32)
        for k, v in tm.state_dict().items()
        if k in ("pos_embed", "patch_embed.proj.weight")
    }
    assert vit.state_dict_config("timm/vit_base_patch16_224", tensors) == {"image_size": 384}
    assert vit.state_dict_config("timm/vit_base_patch16_224", {"pos_embed": np.zeros((1, 197, 8))}) == {}


def test_loading_and_pullbacks_need_neither_torch_nor_timm(tmp_path):
    """A converted timm model saved, loaded (its sizes, normalisation and preprocessing recorded)
    and its pullback computed in a process where importing torch or timm fails."""
    tm, model, x = small("vit")
    path = tmp_path / "vit.safetensors"
    jaxpull.save(model, path)
    loaded = jaxpull.load(path)
    assert loaded.arch == "timm/vit_base_patch16_224" and loaded.spec.config == model.spec.config
    assert loaded.spec.input_mean == (0.5, 0.5, 0.5) and loaded.preprocessing == (224, 248, "bicubic")
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))
    code = (
        "import sys\n"
        "for name in ('torch', 'torchvision', 'timm'):\n"
        "    sys.modules[name] = None  # an import of it raises ImportError\n"
        "import numpy as np, jaxpull\n"
        f"m = jaxpull.load({str(path)!r})\n"
        "x = np.zeros((1, 32, 32, 3), np.float32)\n"
        "jaxpull.pullback(m, x, [1]).block_until_ready()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
