"""Parity with PyTorch for MaxViT (torchvision ``MaxVit``): a reduced-size model (32x32 inputs,
partition 2, two blocks of widths 8 and 16, head width 4) converted with the same code as
maxvit_t, and maxvit_t itself at the level of shapes (meta-device state_dict through
``torch_layout`` against the Flax module's abstract parameters).

The torch model is randomised so that every rule has something to act on: random BatchNorm
statistics, LayerNorm affines, biases and relative position bias tables, weights of scale
1/sqrt(fan-in) (torchvision's N(0, 0.02) makes the signal vanish). The rules (GELU, SiLU,
LayerNorm, attention) are the same in both presets; the attention rule at the presets' t = 1
is the plain gradient, so it is also checked at t = 2, and "value_only".

Tolerances (float32) from helpers.py: logits max |error| <= 1e-4 * max(1, max |logit|); maps
cosine > 0.9999 and max |error| / max |reference| < 1e-3.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

import jaxpull
import jaxpull_convert
from conftest import images, randomize_batchnorm
from helpers import COSINE_MIN, PARITY_METHODS, REL_ERR_MAX, check_parity, map_errors
from jaxpull.core.model import ModelSpec
from jaxpull.core.models import maxvit
from jaxpull.core.settings import VANILLA, resolve
from jaxpull.files import model_file
from jaxpull_convert import torch_reference as R
from jaxpull_convert.state_dict import StateDict

# less codegen effort: each function runs once or twice, on small inputs (conftest.py)
pytestmark = pytest.mark.quick_compile

# one block of two layers: the first strides (average-pooled projection shortcut), the second
# keeps the identity shortcut; its 8x8 map gives windows of 2x2 and a grid of stride 4
SMALL = dict(
    input_size=(32, 32),
    stem_channels=8,
    partition_size=2,
    block_channels=[16],
    block_layers=[2],
    head_dim=4,
    stochastic_depth_prob=0.0,
)
TARGETS = np.array([[1, 7], [3, 500]])


@functools.lru_cache(maxsize=1)
def small_models():
    """(randomised eval-mode torch MaxVit of SMALL sizes, its conversion)."""
    torch.manual_seed(0)
    tm = torchvision.models.maxvit.MaxVit(**SMALL).eval()
    randomize_batchnorm(tm)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in tm.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.normal_(0.0, m.weight[0].numel() ** -0.5, generator=g)
                if m.bias is not None:
                    m.bias.uniform_(-0.1, 0.1, generator=g)
            elif isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
            elif type(m).__name__ == "RelativePositionalMultiHeadAttention":
                m.relative_position_bias_table.normal_(0.0, 1.0, generator=g)
    return tm, jaxpull_convert.from_torch_module("maxvit_t", tm)


def reference(tm, x, rules):
    """The torch reference's pullbacks of TARGETS under ``rules`` (a jaxpull ``Rules``)."""
    return R.pullback(R.gated(tm, rules), torch.from_numpy(x), torch.from_numpy(TARGETS))


def differs(got, ref):
    """True when ``got`` fails the parity tolerances against ``ref`` (a rule left out shows)."""
    cos, rel = map_errors(got, ref)
    return not (cos > COSINE_MIN and rel < REL_ERR_MAX)


def test_full_size_maxvit_t_shapes():
    """maxvit_t's state_dict (meta device: shapes only) converts onto exactly the Flax module's
    parameters; the relative position indices are torchvision's own (computed on the CPU)."""
    with torch.device("meta"):
        tm = torchvision.models.maxvit_t()
    index = torchvision.models.maxvit._get_relative_position_index(7, 7).numpy()
    tensors = {
        k: index if k.endswith("relative_position_index") else np.broadcast_to(np.float32(0), tuple(v.shape))
        for k, v in tm.state_dict().items()
    }
    sd = StateDict(tensors)
    params = maxvit.torch_layout("maxvit_t", sd)
    assert not sd.missing and not sd.unused()
    assert model_file.param_problems(params, ModelSpec("maxvit_t")) == []
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(params))
    n_torch = sum(p.numel() for p in tm.parameters())
    # BatchNorm folding: each BatchNorm after a convolution keeps no parameters of its own
    # (its conv gains a bias where it had none); the MBConv pre-norms become Affine (same count)
    folded = sum(
        m.num_features * 2
        for name, m in tm.named_modules()
        if isinstance(m, torch.nn.BatchNorm2d) and "pre_norm" not in name
    )
    conv_bias_gained = sum(m.out_channels for m in tm.modules() if isinstance(m, torch.nn.Conv2d) and m.bias is None)
    assert n_params == n_torch - folded + conv_bias_gained
    assert maxvit.torch_config(tm) == {}
    assert jaxpull.core.models.get("maxvit_t").preprocessing == maxvit.PREPROCESSING


def test_small_maxvit_parity():
    """Logits, both presets' pullbacks, float64 vanilla gradients and one ascent (check_parity);
    the attention rule at t = 2 and "value_only"; and each rule's effect is visible."""
    tm, model = small_models()
    assert dict(model.spec.config) == dict(
        image_size=32, stem_channels=8, partition_size=2, block_channels=(16,), block_layers=(2,), head_dim=4
    )
    x = images(2, 32)
    # the reference's attention patch keeps the forward exact
    xt = R.normalize(torch.from_numpy(x))
    with torch.no_grad():
        plain = tm(xt)
        patched = R.gated(tm, "semantic", attention_temperature=2.0)(xt)
    assert plain.abs().max() > 0.3
    torch.testing.assert_close(patched, plain, rtol=1e-5, atol=1e-5)

    # one compiled function for the logits, both presets, the vanilla gradient and the two
    # attention variants, each against the reference gated the same way (check_parity)
    methods = {
        **PARITY_METHODS,
        "tempered t=2": dict(rules="semantic", attention_temperature=2.0),
        "value_only": dict(rules="semantic", attention="value_only"),
    }
    parity = check_parity(tm, model, x, TARGETS, methods, ascent_rel=REL_ERR_MAX)
    print("maxvit small parity:", parity.errors)
    maps = {k: v[:, : TARGETS.shape[1]] for k, v in parity.maps.items()}  # the columns of TARGETS

    semantic = resolve("semantic")
    got = maps["semantic"]
    # each rule acts: leaving any one out of the reference gives a map outside the tolerances
    for left_out in (dict(gelu="plain"), dict(silu="plain"), dict(layer_norm="plain")):
        ref = reference(tm, x, semantic.replace(**left_out))
        print("maxvit small, the reference without", left_out, map_errors(got, ref))
        assert differs(got, ref), left_out
    assert differs(got, maps["vanilla"])

    # the tempered attention at t = 2 differs from the reference with plain attention
    got = maps["tempered t=2"]
    ref = reference(tm, x, semantic.replace(attention="plain"))
    print("maxvit small tempered t=2, the reference with plain attention:", map_errors(got, ref))
    assert differs(got, ref)

    # value_only differs from the reference with tempered attention
    got = maps["value_only"]
    ref = reference(tm, x, semantic)
    print("maxvit small value_only, the reference with tempered attention:", map_errors(got, ref))
    assert differs(got, ref)


def test_input_size_is_fixed():
    """Another image size: a ValueError naming the size the model needs (maxvit_t: 224)."""
    module = maxvit.ARCHITECTURES["maxvit_t"]()
    with pytest.raises(ValueError, match="maxvit_t needs 224x224 images"):
        jax.eval_shape(lambda x: module.init(jax.random.key(0), x, VANILLA), jnp.zeros((1, 256, 256, 3)))
    _, model = small_models()
    with pytest.raises(ValueError, match="needs 32x32 images .* got 64x64"):
        model(images(1, 64))


def test_unsupported_torch_maxvit():
    """A torch MaxVit that jaxpull's builder cannot express is refused by name."""
    tm = torchvision.models.maxvit.MaxVit(**{**SMALL, "input_size": (32, 64)})
    with pytest.raises(ValueError, match="non-square input"):
        maxvit.torch_config(tm)
    tm = torchvision.models.maxvit.MaxVit(**SMALL, mlp_ratio=2)
    with pytest.raises(ValueError, match="mlp_ratio"):
        maxvit.torch_config(tm)
