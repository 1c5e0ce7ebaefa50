"""The paper's explainers equal Captum 0.9.0's, map by map (issue 30).

Captum is called as Quantus 0.6.0's ``quantus.explain`` calls it (zero baselines, IG with
``n_steps=10`` and ``"riemann_trapezoid"``, GradientShap's defaults, nearest-neighbour Guided GradCAM)
on the torch model jaxpull converted, its input mapped from [-1, 1] as jaxpull's model maps it. Random
draws are injected: jaxpull's coefficients and noise replace Captum's ``np.random.uniform`` and
``torch.normal``. The pullback forms are compared with Captum run on ``torch_reference.gated(tm,
"semantic")``, the torch model with the same backward rules.

Tolerances (float32 throughout): every map's cosine to Captum's above ``COS_MIN`` and the largest
error below ``REL_MAX`` of Captum's largest value (DeepLift's ratios ``(f(x) - f(x0)) / (x - x0)``
amplify rounding: ``REL_MAX_DEEPLIFT``). Each test prints its measured figures.
"""

from __future__ import annotations

import copy

import jax
import numpy as np
import pytest
import torch
from torch import nn

from conftest import images, torch_and_jax
from helpers import map_errors
from jaxpull.core.models.family import GradCamLayer
from jaxpull.evaluation import attribution, cam, explainers
from jaxpull_convert import torch_reference as R

captum_attr = pytest.importorskip("captum.attr")

# less codegen effort: each function runs once, on small inputs (conftest.py)
pytestmark = [pytest.mark.quick_compile, pytest.mark.filterwarnings("ignore::UserWarning")]

COS_MIN = 0.99999
REL_MAX = 1e-4
REL_MAX_DEEPLIFT = 5e-4
T = np.array([[1, 3], [4, 0]])  # two targets per image: jaxpull explains both in one call


@pytest.fixture(scope="module")
def resnet():
    """A random resnet18 (random BatchNorm) with 5 classes, and 72-px images (layer4 is 3x3)."""
    tm, model = torch_and_jax("resnet18", 5)
    return tm, model, images(2, 72, seed=1)


@pytest.fixture(scope="module")
def vgg():
    """A random vgg11 with 5 classes (ReLU modules used once: Captum's DeepLift runs), 64-px images."""
    tm, model = torch_and_jax("vgg11", 5)
    return tm, model, images(2, 64, seed=1)


class InputSpace(nn.Module):
    """``tm`` on NCHW images in [-1, 1], normalised as jaxpull's model does (the paper's model is the
    same: a normalisation module before the network)."""

    def __init__(self, tm: nn.Module):
        super().__init__()
        self.tm = tm
        self.register_buffer("mean", torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1))

    def forward(self, x):
        return self.tm(((x + 1) / 2 - self.mean) / self.std)


def captum(explainer, tm, x, targets=T, float64=True, **options) -> np.ndarray:
    """``explainer(model).attribute`` for each target column (Captum explains one target per image):
    ``(N, K, H, W, 3)``. In float64 by default: float32 rounding can flip a hard ReLU or max-pool gate
    (torch's or jaxpull's) and the exact computation is the one to compare with; the gated models
    (smooth gates, no flips) run in float32."""
    net = InputSpace(copy.deepcopy(tm) if float64 else tm).eval()
    dtype = torch.float64 if float64 else torch.float32
    net = net.to(dtype)
    xt = torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2).contiguous().to(dtype)
    options = {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in options.items()}
    maps = []
    for k in range(targets.shape[1]):
        a = explainer(net).attribute(xt.clone().requires_grad_(True), target=torch.from_numpy(targets[:, k]), **options)
        maps.append(a.detach().permute(0, 2, 3, 1).numpy())
    return np.stack(maps, axis=1)


def check(name: str, setting: str, got, ref, rel_max: float = REL_MAX) -> None:
    cos, rel = map_errors(got, ref)
    print(f"\n| {name} | {setting} | {rel:.1e} | {cos:.7f} | {rel_max:.0e} |", end="")
    assert np.abs(ref).max() > 0, f"{name}: Captum's maps are zero"
    assert cos > COS_MIN and rel < rel_max, (
        f"{name}: cosine {cos:.7f} (min {COS_MIN}), rel err {rel:.2e} (max {rel_max})"
    )


def zeros_like_input(x) -> torch.Tensor:
    return torch.zeros(x.shape[0], 3, *x.shape[1:3])


def nchw(a) -> torch.Tensor:
    """(S, N, H, W, 3) draws -> Captum's (N * S, 3, H, W), image-major (``repeat_interleave``)."""
    a = np.asarray(a)
    return torch.from_numpy(a.transpose(1, 0, 4, 2, 3).reshape(-1, 3, *a.shape[2:4]).copy())


def test_gradient_guided_backprop_and_soft_pullback(resnet):
    tm, model, x = resnet
    check(
        "Gradient",
        "Saliency(abs=False)",
        explainers.get("Gradient")(model, x, T),
        captum(captum_attr.Saliency, tm, x, abs=False),
    )
    check(
        "guided_backprop",
        "GuidedBackprop",
        explainers.get("guided_backprop")(model, x, T),
        captum(captum_attr.GuidedBackprop, tm, x),
    )
    gated = R.gated(tm, "semantic")
    check(
        "SoftPullback",
        "Saliency on gated(semantic)",
        explainers.get("SoftPullback")(model, x, T),
        captum(captum_attr.Saliency, gated, x, float64=False, abs=False),
    )


def test_integrated_gradients_and_pullbacks(resnet):
    """Quantus: ``IntegratedGradients(model).attribute(x, target, baselines=zeros_like(x), n_steps=10,
    method="riemann_trapezoid")``."""
    tm, model, x = resnet
    options = dict(baselines=zeros_like_input(x), n_steps=10, method="riemann_trapezoid")
    ref = captum(captum_attr.IntegratedGradients, tm, x, **options)
    check(
        "IntegratedGradients",
        "n_steps 10, riemann_trapezoid, zero baseline",
        explainers.get("IntegratedGradients")(model, x, T),
        ref,
    )
    ref = captum(captum_attr.IntegratedGradients, R.gated(tm, "semantic"), x, float64=False, **options)
    check("IntegratedPullbacks", "IG on gated(semantic)", explainers.get("IntegratedPullbacks")(model, x, T), ref)


def test_smoothgrad_equals_noise_tunnel_with_the_same_noise(resnet, monkeypatch):
    """Captum's ``NoiseTunnel(Saliency)`` (``nt_type="smoothgrad"``) given jaxpull's noise draws."""
    tm, model, x = resnet
    samples, sigma, seed = 3, 0.15, 5
    noise = attribution.gaussian_draws(attribution.seed_key(seed), samples, x.shape, sigma)  # (S, N, H, W, 3)
    monkeypatch.setattr(torch, "normal", lambda mean, std: nchw(noise))
    options = dict(nt_type="smoothgrad", nt_samples=samples, stdevs=sigma, abs=False)
    tunnel = lambda net: captum_attr.NoiseTunnel(captum_attr.Saliency(net))
    got = explainers.get("SmoothGrad")(model, x, T, samples=samples, sigma=sigma, seed=seed)
    check("SmoothGrad", "NoiseTunnel(Saliency), 3 samples, stdev 0.15", got, captum(tunnel, tm, x, **options))
    got = explainers.get("SmoothPullback")(model, x, T, samples=samples, sigma=sigma, seed=seed)
    check(
        "SmoothPullback",
        "the same on gated(semantic)",
        got,
        captum(tunnel, R.gated(tm, "semantic"), x, float64=False, **options),
    )


def test_gradient_shap_with_the_same_draws(resnet, monkeypatch):
    """Quantus: ``GradientShap(model).attribute(x, target, baselines=zeros_like(x))`` (5 samples,
    stdevs 0); its ``a ~ U(0, 1)`` (``np.random.uniform``) replaced by jaxpull's, and with stdevs > 0
    its noise (``torch.normal``) too."""
    tm, model, x = resnet
    seed = 2
    alphas, k_noise = attribution.shap_draws(seed, 5, x.shape[0])  # (S, N)
    monkeypatch.setattr(
        np.random, "uniform", lambda low, high, size: np.asarray(alphas).T.reshape(-1).astype(np.float64)
    )
    ref = captum(captum_attr.GradientShap, tm, x, baselines=zeros_like_input(x))
    check(
        "GradientShap",
        "5 samples, stdevs 0, zero baseline",
        explainers.get("GradientShap")(model, x, T, seed=seed),
        ref,
    )
    ref = captum(captum_attr.GradientShap, R.gated(tm, "semantic"), x, float64=False, baselines=zeros_like_input(x))
    check("PullbackShap", "the same on gated(semantic)", explainers.get("PullbackShap")(model, x, T, seed=seed), ref)
    stdev = 0.1
    monkeypatch.setattr(torch, "normal", lambda mean, std: nchw(attribution.gaussian_draws(k_noise, 5, x.shape, stdev)))
    ref = captum(captum_attr.GradientShap, tm, x, baselines=zeros_like_input(x), stdevs=stdev)
    check(
        "GradientShap",
        "5 samples, stdevs 0.1",
        explainers.get("GradientShap")(model, x, T, seed=seed, stdevs=stdev),
        ref,
    )


class Clone(nn.Module):
    """A module between a ReLU and a max-pool, so that Captum's hook on the max-pool's input is not
    on the ReLU's output tensor (see test_deeplift)."""

    def forward(self, x):
        return x.clone()


def test_deeplift_equals_captum_and_adds_up(vgg, resnet):
    """DeepLift's rescale rule on VGG11 (ReLUs and 2x2 max-pools). Captum records a ReLU's output
    gradient before the max-pool's hook replaces it when the ReLU's output tensor goes straight into
    a max-pool module, so its max-pool multiplier is lost there and its maps do not add up to
    ``f(x) - f(0)``; with a module in between (``Clone``) Captum computes the rule, and equals jaxpull.
    PbDeepLift: Captum's DeepLift on the gated model, whose modules it does not hook."""
    tm, model, x = vgg
    zero = zeros_like_input(x)
    separated = copy.deepcopy(tm)
    for i, m in enumerate(separated.features):
        if isinstance(m, nn.MaxPool2d):
            separated.features[i] = nn.Sequential(Clone(), m)
    got = np.asarray(explainers.get("DeepLift")(model, x, T))
    check(
        "DeepLift",
        "zero baseline, VGG11 (Clone before each max-pool)",
        got,
        captum(captum_attr.DeepLift, separated, x, float64=False, baselines=zero),
        REL_MAX_DEEPLIFT,
    )
    stock = captum(captum_attr.DeepLift, tm, x, float64=False, baselines=zero)
    cos, rel = map_errors(got, stock)
    print(
        f"\n| DeepLift | stock VGG11 (ReLU straight into max-pool): not compared | {rel:.1e} | {cos:.7f} | - |", end=""
    )
    ref = captum(captum_attr.DeepLift, R.gated(tm, "semantic"), x, float64=False, baselines=zero)
    check("PbDeepLift", "DeepLift on gated(semantic), VGG11", explainers.get("PbDeepLift")(model, x, T), ref)

    # summation to delta, on VGG11 and on resnet18 (residuals, overlapping 3x3/2 max-pool: Captum
    # rejects torchvision's ResNet, whose blocks use one nn.ReLU twice)
    for name, (m, xs) in {"vgg11": (model, x), "resnet18": (resnet[1], resnet[2])}.items():
        a = np.asarray(explainers.get("DeepLift")(m, xs, T), np.float64).sum(axis=(2, 3, 4))
        delta = np.take_along_axis(np.asarray(m(xs)) - np.asarray(m(np.zeros_like(xs))), T, axis=1)
        err = np.abs(a - delta).max() / np.abs(delta).max()
        print(f"\n| DeepLift | {name}: sum of the map vs f(x) - f(0) | {err:.1e} | - | 1e-04 |", end="")
        assert err < 1e-4, (name, a, delta)
    with pytest.raises(RuntimeError, match="used more than once"):
        captum(captum_attr.DeepLift, resnet[0], resnet[2], baselines=zeros_like_input(resnet[2]))
    tm, model, x = resnet
    ref = captum(captum_attr.DeepLift, R.gated(tm, "semantic"), x, float64=False, baselines=zeros_like_input(x))
    check("PbDeepLift", "DeepLift on gated(semantic), resnet18", explainers.get("PbDeepLift")(model, x, T), ref)
    # the paper's own DeepLift column: its evaluation first swaps every nn.ReLU / nn.MaxPool2d for a
    # subclass (plain backward for the baselines), Captum's exact-type test then hooks none of them
    swapped = copy.deepcopy(tm)
    for m in swapped.modules():
        if type(m) in (nn.ReLU, nn.MaxPool2d):
            m.__class__ = type("Surrogate" + type(m).__name__, (type(m),), {})
    ref = captum(captum_attr.DeepLift, swapped, x, baselines=zeros_like_input(x))
    check(
        "gradient_x_input",
        "the paper's DeepLift: Captum on its swapped classes",
        explainers.get("gradient_x_input")(model, x, T),
        ref,
    )


class PaperSurrogateReLU(R.GatedReLU, nn.ReLU):
    """The paper's surrogate ReLU is a subclass of ``nn.ReLU``: Captum's Guided Backprop hooks it."""


def paper_surrogates(tm: nn.Module) -> nn.Module:
    """``gated(tm, "semantic")`` whose gated ReLUs are ``nn.ReLU`` instances, as the paper's are."""
    g = R.gated(tm, "semantic")
    for m in g.modules():
        if type(m) is R.GatedReLU:
            m.__class__ = PaperSurrogateReLU
    return g


def test_guided_gradcam_resnet_layer_before_batchnorm(resnet):
    """Captum's ``GuidedGradCam(model, layer4[-1].conv2)``: the convolution before its BatchNorm, the
    family's default for resnet18 (the paper's ``layer4[-1].conv3`` of resnet50)."""
    tm, model, x = resnet
    ref = captum(lambda net: captum_attr.GuidedGradCam(net, net.tm.layer4[-1].conv2), tm, x)
    check("GuidedGradCam", "layer4[-1].conv2 (before bn2), nearest", explainers.get("GuidedGradCam")(model, x, T), ref)
    got = explainers.get("GuidedGradCam")(model, x, T, layer=GradCamLayer("layer4[-1].conv2", before_batchnorm=True))
    np.testing.assert_array_equal(got, explainers.get("GuidedGradCam")(model, x, T))
    g = paper_surrogates(tm)
    ref = captum(lambda net: captum_attr.GuidedGradCam(net, net.tm.layer4[-1].conv2), g, x, float64=False)
    check(
        "GuidedPbCam", "the same on the paper's surrogates (semantic)", explainers.get("GuidedPbCam")(model, x, T), ref
    )
    ref = captum(lambda net: captum_attr.GuidedGradCam(net, net.tm.layer4[-1].bn1), tm, x)  # a folded conv's output
    check(
        "GuidedGradCam",
        "layer4[-1].bn1 (jaxpull's layer4.1.conv1)",
        cam.guided_gradcam(model, x, T, layer="layer4.1.conv1"),
        ref,
    )


def test_guided_gradcam_vgg_avgpool(vgg):
    """The paper's VGG layer, ``avgpool`` (7x7 from the 2x2 feature map, upsampled to 64 px). VGG11 in
    float32 (in float64 a copy takes 1 GB; no gate flips on these images)."""
    tm, model, x = vgg
    ref = captum(lambda net: captum_attr.GuidedGradCam(net, net.tm.avgpool), tm, x, float64=False)
    check("GuidedGradCam", "avgpool, nearest", explainers.get("GuidedGradCam")(model, x, T), ref)
    g = paper_surrogates(tm)
    ref = captum(lambda net: captum_attr.GuidedGradCam(net, net.tm.avgpool), g, x, float64=False)
    check(
        "GuidedPbCam", "avgpool on the paper's surrogates (semantic)", explainers.get("GuidedPbCam")(model, x, T), ref
    )


def _load_folded(tm: nn.Module, params) -> None:
    """Put a resnet18's jaxpull parameters (BatchNorm folded, possibly perturbed) into torch's ``tm``:
    each convolution takes the folded kernel, its BatchNorm becomes ``x + bias``."""
    p = jax.tree.map(np.asarray, params)
    pairs = [("conv1", "bn1", p["conv1"])]
    for stage in range(1, 5):
        for block, q in p[f"layer{stage}"].items():
            pre = f"layer{stage}.{block}"
            pairs += [(f"{pre}.conv{j}", f"{pre}.bn{j}", q[f"conv{j}"]) for j in (1, 2)]
            if "downsample" in q:
                pairs.append((f"{pre}.downsample.0", f"{pre}.downsample.1", q["downsample"]))
    modules = dict(tm.named_modules())
    with torch.no_grad():
        for conv, bn, q in pairs:
            modules[conv].weight.copy_(torch.from_numpy(q["kernel"].transpose(3, 2, 0, 1)))
            b = modules[bn]
            (
                b.running_mean.zero_(),
                b.running_var.fill_(1 - b.eps),
                b.weight.fill_(1),
                b.bias.copy_(torch.from_numpy(q["bias"])),
            )
        tm.fc.weight.copy_(torch.from_numpy(p["fc"]["kernel"].T)), tm.fc.bias.copy_(torch.from_numpy(p["fc"]["bias"]))


def test_fusiongrad_equals_the_papers_loop_with_the_same_draws(resnet):
    """The paper's ``fusiongrad_explainer`` (written here: for each model draw, Captum's ``Saliency``
    at each noisy copy, all averaged) given jaxpull's perturbed parameters and input noise."""
    tm, model, x = resnet
    psamples, samples, seed = 2, 2, 3
    model_keys, input_keys = attribution.fusion_keys(attribution.seed_key(seed), psamples)
    maps = []
    for i in range(psamples):
        noisy = attribution.perturb_parameters(model, model_keys[i], 0.1)
        ratio = np.asarray(noisy.params["layer1"]["0"]["conv1"]["kernel"]) / np.asarray(
            model.params["layer1"]["0"]["conv1"]["kernel"]
        )
        assert abs(ratio.mean() - 1) < 0.01 and abs(ratio.std() - 0.1) < 0.01  # each parameter times N(1, 0.1^2)
        torch_copy = copy.deepcopy(tm)
        _load_folded(torch_copy, noisy.params)
        for n in np.asarray(attribution.gaussian_draws(input_keys[i], samples, x.shape, 0.15)):
            maps.append(captum(captum_attr.Saliency, torch_copy, x + n, abs=False))
    got = explainers.get("FusionGrad")(model, x, T, parameter_samples=psamples, samples=samples, seed=seed)
    check("FusionGrad", "2 x 2 draws, parameter sigma 0.1, input sigma 0.15", got, np.mean(maps, axis=0))
