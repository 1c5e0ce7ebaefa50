"""The explainers: one signature, and the property each one is defined by."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpull
import jaxpull.core.models
from conftest import images
from jaxpull.core import pullback, settings
from jaxpull.core.rules import ReLU
from jaxpull.evaluation import cam, explainers

# Less codegen effort for the tests that compile about thirty explainers for a tiny model and run each
# once or twice (conftest.py); they come first, together, so that their compiled functions are shared.
quick = pytest.mark.quick_compile

FAST = {
    "smoothgrad": {"samples": 3},
    "smoothgrad_pullback": {"samples": 3},
    "integrated_gradients": {"steps": 4},
    "pullback_ascent": {"steps": 2},
    "gradient_ascent": {"steps": 2},
    "SmoothPullback": {"samples": 3},
    "SmoothGrad": {"samples": 3},
    "FusionGrad": {"samples": 2, "parameter_samples": 2},
    "FusionPullback": {"samples": 2, "parameter_samples": 2},
    "GradientShap": {"samples": 2},
    "PullbackShap": {"samples": 2},
    "IntegratedGradients": {"steps": 4},
    "IntegratedPullbacks": {"steps": 4},
    "PullbackAscent": {"steps": 2},
    "PullbackAscentClipLast": {"steps": 2},
    "PullbackAscentNoAlpha": {"steps": 2},
    "GradientAscent": {"steps": 2},
    "GradientAscentClipLast": {"steps": 2},
}


@quick
@pytest.mark.parametrize("name", list(explainers.EXPLAINERS))
def test_every_explainer_has_the_common_signature(tiny_model, name):
    x = images(2, 32)
    a = explainers.get(name)(tiny_model, x, [1, 4], **FAST.get(name, {}))
    assert a.shape == (2, 2, 32, 32, 3) and a.dtype == jnp.float32
    assert np.isfinite(np.asarray(a)).all() and float(jnp.abs(a).max()) > 0


# --------------------------------------------------------------------------------------
# The paper's current explainers (lib/evaluator.py): "semantic" rules by default
# --------------------------------------------------------------------------------------


# The same shapes as the signature test above, (2, 32, 32, 3) and targets [1, 4], so that the
# compiled functions are shared (the noise samples and ascent steps are traced or the same).
T = [1, 4]


@quick
def test_soft_pullback_is_the_semantic_pullback(tiny_model):
    x = images(2, 32, seed=4)
    soft = explainers.get("SoftPullback")(tiny_model, x, T)
    np.testing.assert_array_equal(soft, jaxpull.pullback(tiny_model, x, T, rules="semantic"))
    assert not np.allclose(soft, explainers.pullback(tiny_model, x, T))  # not the excitation default
    np.testing.assert_array_equal(
        explainers.soft_pullback(tiny_model, x, T, temperature=0.4),
        jaxpull.pullback(tiny_model, x, T, rules="semantic", temperature=0.4),
    )


@quick
def test_pullback_ascent_leaves_the_box_and_the_clamped_ones_do_not(tiny_model):
    x = images(2, 32, seed=5)
    free = x[:, None] + explainers.get("PullbackAscent")(tiny_model, x, T, steps=2)
    every = x[:, None] + explainers.pullback_ascent(tiny_model, x, T, rules="semantic", steps=2)
    last = x[:, None] + explainers.get("PullbackAscentClipLast")(tiny_model, x, T, steps=2)
    assert float(jnp.abs(free).max()) > 1.05  # unclamped: it leaves [-1, 1]
    assert float(jnp.abs(every).max()) <= 1.0 and float(jnp.abs(last).max()) <= 1.0
    assert not np.allclose(last, every, atol=1e-3)  # clamping once is not clamping every step
    np.testing.assert_allclose(
        free, jaxpull.ascent(tiny_model, x, T, rules="semantic", steps=2, clip="none"), atol=1e-6
    )


@quick
def test_clip_last_is_the_unclamped_ascent_then_one_clamped_step(tiny_model):
    """K - 1 unclamped steps (PullbackAscent), then the K-th step by hand: semantic pullback,
    x + 20 g / ||g||_2 per (image, target), clamped to [-1, 1]."""
    x = images(2, 32, seed=6)
    before = (x[:, None] + explainers.get("PullbackAscent")(tiny_model, x, T, steps=2)).reshape(4, 32, 32, 3)
    assert float(jnp.abs(before).max()) > 1.0  # the first steps were not clamped
    labels = jnp.asarray([[1], [4], [1], [4]])
    g = pullback.pullback_core(tiny_model, before, labels, settings.resolve("semantic"))[:, 0]
    step = 20.0 * g / jnp.sqrt(jnp.sum(g**2, axis=(1, 2, 3), keepdims=True))
    expected = jnp.clip(before + step, -1.0, 1.0).reshape(2, 2, 32, 32, 3)
    got = x[:, None] + explainers.get("PullbackAscentClipLast")(tiny_model, x, T, steps=3)
    np.testing.assert_allclose(got, expected, atol=2e-5)


@quick
def test_smooth_pullback(tiny_model):
    x = images(2, 32, seed=7)
    smooth = explainers.get("SmoothPullback")
    no_noise = smooth(tiny_model, x, T, samples=3, sigma=0.0)  # n copies of the same map
    np.testing.assert_allclose(no_noise, explainers.soft_pullback(tiny_model, x, T), rtol=1e-5, atol=1e-8)
    a = smooth(tiny_model, x, T, samples=3, seed=7)
    np.testing.assert_array_equal(a, smooth(tiny_model, x, T, samples=3, seed=7))  # reproducible
    assert not np.allclose(a, smooth(tiny_model, x, T, samples=3, seed=8))
    assert not np.allclose(a, no_noise)


@quick
def test_current_explainers_bad_input(tiny_model):
    x = images(1, 32)
    for name in ("PullbackAscent", "PullbackAscentClipLast"):
        with pytest.raises(ValueError, match=f"{name} fixes its clamping: drop clip"):
            explainers.get(name)(tiny_model, x, [1], clip="every")
    with pytest.raises(ValueError, match="unknown rules 'paper'"):
        explainers.get("SoftPullback")(tiny_model, x, [1], rules="paper")
    with pytest.raises(ValueError, match="sigma must be finite and >= 0"):
        explainers.get("SmoothPullback")(tiny_model, x, [1], sigma=-0.1)
    with pytest.raises(ValueError, match=r"margin must be a number in \[0, 1e\+06\]"):
        explainers.get("PullbackAscentClipLast")(tiny_model, x, [1], margin=-1)


# --------------------------------------------------------------------------------------
# The paper's explainers: the registry, the definitions Captum cannot check, bad input
# --------------------------------------------------------------------------------------


def assert_close(got, want, rel: float = 1e-5) -> None:
    """Largest error at most ``rel`` of the largest value (one float32 computation against another)."""
    got, want = np.asarray(got), np.asarray(want)
    assert np.abs(got - want).max() <= rel * np.abs(want).max(), np.abs(got - want).max() / np.abs(want).max()


def test_the_registry_names_the_papers_explainers_and_their_pairs():
    assert set(explainers.PAPER_EXPLAINERS) == {
        *("SoftPullback", "PullbackAscent", "PullbackAscentClipLast", "PullbackAscentNoAlpha", "GradientAscent"),
        *("GradientAscentClipLast", "SmoothPullback", "FusionPullback", "SmoothGrad", "FusionGrad", "Gradient"),
        *("PullbackShap", "GradientShap", "IntegratedPullbacks", "IntegratedGradients", "PbDeepLift", "DeepLift"),
        *("GuidedGradCam", "GuidedPbCam"),
    }
    assert set(explainers.PAPER_PAIRS) | set(explainers.PAPER_PAIRS.values()) <= set(explainers.PAPER_EXPLAINERS)
    assert explainers.get("integrated_gradients") is explainers.get("IntegratedGradients")
    with pytest.raises(ValueError, match="unknown explainer 'GuidedGradCAM': use one of"):
        explainers.get("GuidedGradCAM")


def test_each_family_declares_its_gradcam_layer():
    from jaxpull.core.models import resnet
    from jaxpull.core.models.family import Family, GradCamLayer

    get = jaxpull.core.models.get
    assert get("resnet50").gradcam_layer == GradCamLayer("layer4.-1.conv3", before_batchnorm=True)  # the paper's
    assert get("resnet34").gradcam_layer == GradCamLayer("layer4.-1.conv2", before_batchnorm=True)
    assert get("vgg11_bn").gradcam_layer == GradCamLayer("avgpool")  # the paper's
    assert get("vit_b_16").gradcam_layer is None and get("swin_t").gradcam_layer is None
    with pytest.raises(TypeError, match="Family.gradcam_layer must be a GradCamLayer"):
        Family(
            architectures=resnet.ARCHITECTURES,
            torch_layout=resnet.torch_layout,
            max_pools=True,
            classifier="fc",
            gradcam_layer="fc",
        )


@quick
def test_pullback_forms_are_their_baselines_under_semantic_rules(tiny_model):
    x = images(2, 32, seed=8)
    soft = explainers.get("SoftPullback")(tiny_model, x, T)
    np.testing.assert_array_equal(soft, explainers.get("Gradient")(tiny_model, x, T, rules="semantic"))
    # PbDeepLift: no ReLU or max-pool rule of "semantic" is plain, so no DeepLift multiplier: x * pullback
    assert_close(explainers.get("PbDeepLift")(tiny_model, x, T), soft * x[:, None])
    # NoAlpha's one step is x + pullback; GradientAscent's steps follow the vanilla gradient, unclamped
    assert_close(explainers.get("PullbackAscentNoAlpha")(tiny_model, x, T, steps=1), soft)
    got = explainers.get("GradientAscent")(tiny_model, x, T, steps=2)
    want = jaxpull.ascent(tiny_model, x, T, rules="vanilla", ascent=explainers.PAPER_ASCENT, clip="none", steps=2)
    np.testing.assert_allclose(got, want - x[:, None], atol=1e-6)
    assert float(jnp.abs(x[:, None] + got).max()) > 1.05  # never clamped


@quick
def test_fusiongrad_without_noise_is_the_gradient(tiny_model):
    x = images(2, 32, seed=9)
    fast = dict(samples=2, parameter_samples=2)
    quiet = explainers.get("FusionGrad")(tiny_model, x, T, sigma=0.0, parameter_sigma=0.0, **fast)
    assert_close(quiet, explainers.get("Gradient")(tiny_model, x, T))
    a = explainers.get("FusionGrad")(tiny_model, x, T, seed=1, **fast)
    np.testing.assert_array_equal(a, explainers.get("FusionGrad")(tiny_model, x, T, seed=1, **fast))
    smooth_only = explainers.get("FusionGrad")(tiny_model, x, T, seed=1, parameter_sigma=0.0, **fast)
    assert not np.allclose(a, smooth_only)  # the parameters were perturbed


@quick
def test_gradcam_layers_by_name_and_the_guided_part(tiny_model):
    x = images(2, 32, seed=10)
    default = cam.resolve_layer(tiny_model, None, (32, 32))
    assert default == (("layer4", "1", "conv2"), True)  # resnet18's blocks end in conv2
    for name in ("layer4[-1].conv2", "layer4/1/conv2", "layer4.1.conv2", "layer4_-1_conv2"):
        assert cam.resolve_layer(tiny_model, name, (32, 32)) == (("layer4", "1", "conv2"), False)
    heat = cam.gradcam(tiny_model, x, T)
    assert heat.shape == (2, 2, 32, 32) and float(heat.min()) >= 0
    guided = explainers.get("GuidedGradCam")(tiny_model, x, T)
    assert_close(guided, explainers.guided_backprop(tiny_model, x, T) * heat[..., None])
    assert cam.nearest_indices(3, 8).tolist() == [0, 0, 0, 1, 1, 1, 2, 2]  # torch's floor(i * 3 / 8)


def test_gradcam_bad_layers(tiny_model, monkeypatch):
    x = images(1, 32)
    with pytest.raises(ValueError, match=r"unknown GradCAM layer 'layer5.conv1' for resnet18: name a module"):
        cam.guided_gradcam(tiny_model, x, [1], layer="layer5.conv1")
    with pytest.raises(ValueError, match="unknown GradCAM layer 'layer4.-3'"):
        cam.guided_gradcam(tiny_model, x, [1], layer="layer4.-3")
    with pytest.raises(ValueError, match="'fc' of resnet18 is not a convolution with a folded BatchNorm"):
        cam.guided_gradcam(tiny_model, x, [1], layer=cam.GradCamLayer("fc", before_batchnorm=True))
    with pytest.raises(ValueError, match="layer must be a module path"):
        cam.guided_gradcam(tiny_model, x, [1], layer=3)
    with pytest.raises(ValueError, match="before_batchnorm must be True or False"):
        cam.guided_gradcam(tiny_model, x, [1], layer=cam.GradCamLayer("layer4.1.conv2", "yes"))
    with pytest.raises(ValueError, match=r"GradCAM needs a layer with a spatial output \(N, h, w, C\); fc gives"):
        cam.guided_gradcam(tiny_model, x, [1], layer="fc")
    no_layer = jaxpull.core.models.get("resnet18")._replace(gradcam_layer=None)
    monkeypatch.setattr(cam.models, "get", lambda arch: no_layer)
    with pytest.raises(ValueError, match="resnet18 declares no GradCAM layer: pass layer="):
        explainers.get("GuidedPbCam")(tiny_model, x, [1])


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("SmoothPullback", dict(seed=2**70), r"seed must be a whole number in \[0, 4294967295\]"),
        ("SmoothGrad", dict(seed=-1), "seed must be a whole number"),
        ("GradientShap", dict(seed=1.5), "seed must be a whole number"),
        ("FusionGrad", dict(seed=True), "seed must be a whole number"),
        ("SmoothGrad", dict(samples=0), "samples must be a positive integer"),
        ("FusionPullback", dict(parameter_samples=0), "parameter_samples must be a positive integer"),
        ("FusionGrad", dict(samples=float("nan")), "samples must be a positive integer"),
        ("GradientShap", dict(samples=float("inf")), "samples must be a positive integer"),
        ("FusionGrad", dict(samples=1000, parameter_samples=1000), "parameter_samples \\* samples must be at most"),
        ("SmoothGrad", dict(sigma=float("nan")), "sigma must be finite and >= 0"),
        ("FusionGrad", dict(parameter_sigma=float("inf")), "parameter_sigma must be finite and >= 0"),
        ("PullbackShap", dict(stdevs=-0.1), "stdevs must be finite and >= 0"),
        ("IntegratedGradients", dict(steps=1), "steps must be an integer >= 2"),
        ("IntegratedGradients", dict(method="simpson"), "unknown integration method 'simpson'"),
        ("IntegratedPullbacks", dict(baseline=float("nan")), "baseline must be a finite number"),
        ("DeepLift", dict(baseline="black"), "baseline must be a number"),
        ("DeepLift", dict(temperature=-1.0), "temperature must be a positive number"),
        ("GradientAscent", dict(clip="every"), "GradientAscent fixes its clamping: drop clip"),
        ("PullbackAscentNoAlpha", dict(alpha=5.0), "PullbackAscentNoAlpha fixes its step size: drop alpha"),
        ("Gradient", dict(rules="paper"), "unknown rules 'paper'"),
        ("GuidedGradCam", dict(tempreature=0.4), "unknown setting"),
    ],
)
def test_bad_settings_are_one_line_errors(tiny_model, name, options, message):
    with pytest.raises(ValueError, match=message) as e:
        explainers.get(name)(tiny_model, images(1, 32), [1], **options)
    assert "\n" not in str(e.value)


def test_definitions_in_terms_of_the_core(tiny_model):
    x = images(2, 32, seed=1)
    t = [[3], [5]]
    grad = explainers.gradient(tiny_model, x, t)
    assert np.allclose(explainers.gradient_x_input(tiny_model, x, t), grad * x[:, None], atol=1e-7)
    assert np.allclose(explainers.pullback(tiny_model, x, t), jaxpull.pullback(tiny_model, x, t, temperature=0.3))
    diff = explainers.pullback_ascent(tiny_model, x, t, steps=2)
    assert np.allclose(diff, jaxpull.ascent(tiny_model, x, t, steps=2) - x[:, None], atol=1e-6)


def test_guided_backprop_rule_by_hand():
    # d/dz sum(w * relu(z)) with w = [1, -1, 2, 3], z = [1, 2, -1, 0]:
    # vanilla [1, -1, 0, 0]; guided drops the negative incoming gradient too: [1, 0, 0, 0]
    w, z = jnp.array([1.0, -1, 2, 3]), jnp.array([1.0, 2, -1, 0])
    vanilla = jax.grad(lambda z: jnp.sum(w * ReLU(mode="plain")(z)))(z)
    guided = jax.grad(lambda z: jnp.sum(w * ReLU(mode="guided")(z)))(z)
    assert vanilla.tolist() == [1, -1, 0, 0] and guided.tolist() == [1, 0, 0, 0]
    z6 = jnp.array([1.0, 7.0, 3.0])
    guided6 = jax.grad(lambda z: jnp.sum(jnp.array([1.0, 1, -1]) * ReLU(mode="guided")(z, max_value=6)))(z6)
    assert guided6.tolist() == [1, 0, 0]


def test_guided_backprop_differs_from_the_gradient(tiny_model):
    x = images(1, 32)
    g = explainers.gradient(tiny_model, x, [2])
    gb = explainers.guided_backprop(tiny_model, x, [2])
    assert not np.allclose(g, gb)


def test_integrated_gradients_completeness(tiny_model):
    # sum of IG = f(x) - f(0) up to the quadrature error of the trapezoid rule
    x = images(2, 32, seed=2) * 0.5
    t = np.array([[1], [7]])
    ig = explainers.integrated_gradients(tiny_model, x, t, steps=128)
    logits, zero = np.asarray(tiny_model(x)), np.asarray(tiny_model(np.zeros_like(x)))
    expected = logits[[0, 1], t[:, 0]] - zero[[0, 1], t[:, 0]]
    assert np.allclose(np.asarray(ig).sum(axis=(2, 3, 4))[:, 0], expected, rtol=2e-2, atol=1e-3)


def test_smoothgrad_is_reproducible_and_tends_to_the_gradient(tiny_model):
    x = images(1, 32, seed=3)
    a = explainers.smoothgrad(tiny_model, x, [4], samples=4, seed=7)
    assert np.array_equal(a, explainers.smoothgrad(tiny_model, x, [4], samples=4, seed=7))
    assert not np.array_equal(a, explainers.smoothgrad(tiny_model, x, [4], samples=4, seed=8))
    grad = explainers.gradient(tiny_model, x, [4])
    tiny_noise = explainers.smoothgrad(tiny_model, x, [4], samples=2, sigma=1e-7)
    assert np.allclose(tiny_noise, grad, rtol=1e-3, atol=1e-6)
    pb = explainers.pullback(tiny_model, x, [4])
    assert np.allclose(
        explainers.smoothgrad_pullback(tiny_model, x, [4], samples=2, sigma=1e-7), pb, rtol=1e-3, atol=1e-6
    )


def test_bad_input(tiny_model):
    x = images(1, 32)
    with pytest.raises(ValueError, match="unknown explainer 'lime'"):
        explainers.get("lime")
    with pytest.raises(ValueError, match="samples must be a positive integer"):
        explainers.smoothgrad(tiny_model, x, [1], samples=0)
    with pytest.raises(ValueError, match="sigma must be finite and >= 0"):
        explainers.smoothgrad(tiny_model, x, [1], sigma=-1)
    with pytest.raises(ValueError, match="steps must be an integer >= 2"):
        explainers.integrated_gradients(tiny_model, x, [1], steps=0)
    with pytest.raises(ValueError, match="out of range"):
        explainers.guided_backprop(tiny_model, x, [10])
