"""The paper's metrics in JAX against Quantus 0.6.0 itself, score by score.

The perturbation metrics run on one random resnet18 (10 classes) converted by jaxpull; Quantus
gets the torch model wrapped to take [-1, 1] NCHW images and normalise them as jaxpull's model
does. The explainer metrics and other settings run on a small MLP given to both sides with the
same weights (no network to compile for each). Both sides get the same images and attributions
(the explainer, where a metric needs one, is the same function on both sides: the gradient of
jaxpull's MLP, so only the metric differs). Where Quantus draws random values from numpy's
global generator, the test seeds it and hands jaxpull the very values Quantus draws, in Quantus'
order of draws: equal scores show the perturbations are the same.

Images are 72 pixels with the paper's patch sizes scaled by 72/224 (36/18-pixel patches; 324
features per step: 48 groups, as the paper's 3136 on 224 pixels); the functions' defaults are
the paper's. (72, not 64: XLA:CPU runs the 3x3 convolutions of resnet18's last stage about 30x
slower on 2x2 maps than on 3x3 ones.)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpull.evaluation import faithfulness, metrics, mosaics
from jaxpull_convert.quantus_reference import UNIFORM, paper_correlation, paper_infidelity

quantus = pytest.importorskip("quantus")  # the test extra installs quantus==0.6.0
torch = pytest.importorskip("torch")

# less codegen effort: each function compiles once and runs on small inputs (conftest.py)
pytestmark = pytest.mark.quick_compile

SIZE = 72
SEED = 7
# Scores are compared to |jaxpull - Quantus| <= TOL * max(1, |Quantus|): both sides compute in
# float32 (Quantus aggregates some sums in float64), the models agree to about 1e-6.
TOL = 1e-5
INFIDELITY_TOL = 5e-5  # see test_other_settings_equal_quantus_on_a_small_network
# metric -> (Quantus setting, largest |jaxpull - Quantus|, largest relative difference), printed
# at the end of the module (pytest -s)
MEASURED = {}


@pytest.fixture(scope="module", autouse=True)
def _print_measured():
    yield
    print("\n| metric | Quantus setting | max abs diff | max rel diff |")
    for name, (what, err, rel) in MEASURED.items():
        print(f"| {name} | {what} | {err:.1e} | {rel:.1e} |")


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Quantus runs many small batches: one torch thread is several times faster than two
    fighting over a busy 2-core machine (0.7 s instead of 14 s for 40 resnet18 calls here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def close(name: str, what: str, got, want, tol: float = TOL) -> None:
    """Assert the scores agree and record the differences under ``name``."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape and np.isfinite(want).all(), (got, want)
    diff = np.abs(got - want)
    assert (diff <= tol * np.maximum(1.0, np.abs(want))).all(), f"{name}: jaxpull {got} vs Quantus {want}"
    old_what, err, rel = MEASURED.get(name, (what, 0.0, 0.0))
    MEASURED[name] = (old_what or what, max(err, diff.max()), max(rel, (diff / np.abs(want)).max()))


def nchw(a):
    return np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2))


def nhwc(a):
    return np.asarray(a).transpose(0, 2, 3, 1)


class Wrapped(torch.nn.Module):
    """The torch model taking [-1, 1] NCHW images, normalised as jaxpull's model does."""

    def __init__(self, tm):
        super().__init__()
        self.tm = tm
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x):
        return self.tm(((x + 1) / 2 - self.mean) / self.std)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MLP:
    """logits = relu(x w1 + b1) w2 + b2 on the image flattened channel-first: a stand-in with
    ``apply`` like ``Model``, and the same network as :func:`torch_mlp`."""

    w1: jax.Array
    b1: jax.Array
    w2: jax.Array
    b2: jax.Array

    def apply(self, x):
        flat = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        return jnp.maximum(flat @ self.w1 + self.b1, 0.0) @ self.w2 + self.b2


def mlp_pair(h: int, w: int, hidden: int = 32, classes: int = 10, seed: int = 3):
    """(torch MLP in eval mode, the same :class:`MLP`) for ``h`` x ``w`` images."""
    rng = np.random.default_rng(seed)
    d = 3 * h * w
    w1 = (rng.normal(size=(d, hidden)) / np.sqrt(d)).astype(np.float32)
    b1 = rng.normal(size=hidden).astype(np.float32) * 0.1
    w2 = rng.normal(size=(hidden, classes)).astype(np.float32)
    b2 = rng.normal(size=classes).astype(np.float32)
    tm = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(d, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10)
    )
    with torch.no_grad():
        tm[1].weight.copy_(torch.from_numpy(w1.T))
        tm[1].bias.copy_(torch.from_numpy(b1))
        tm[3].weight.copy_(torch.from_numpy(w2.T))
        tm[3].bias.copy_(torch.from_numpy(b2))
    return tm.eval(), MLP(*map(jnp.asarray, (w1, b1, w2, b2)))


def data(n: int, h: int, w: int, seed: int = 0):
    """Images in [-1, 1], targets and continuous attributions (no ties in their rankings)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (n, h, w, 3)).astype(np.float32)
    return x, np.array([1, 4, 7, 2][:n]), rng.normal(size=x.shape).astype(np.float32)


def gradient(model):
    """jaxpull's vanilla gradient of each image's target logit, (N, H, W, 3), (N,) -> (N, H, W, 3)."""
    grad = jax.jit(jax.grad(lambda x, t: jnp.sum(jnp.take_along_axis(model.apply(x), t[:, None], 1))))
    return lambda x, t: grad(jnp.asarray(x), jnp.asarray(t, jnp.int32))


def quantus_explain(explain, seen=None):
    """The same explainer as Quantus' explain_func (channel-first numpy in and out)."""

    def run(model, inputs, targets, **kwargs):
        if seen is not None:
            seen.append(np.asarray(targets).copy())
        return nchw(explain(nhwc(inputs), np.asarray(targets)))

    return run


def quantus_scores(metric, torch_model, x, t, a, **kw) -> np.ndarray:
    out = metric(model=torch_model, x_batch=nchw(x), y_batch=t, a_batch=nchw(a), channel_first=True, device="cpu", **kw)
    return np.asarray(out)


@pytest.fixture(scope="module")
def resnet():
    """(wrapped torch resnet18, jaxpull's conversion)."""
    from conftest import torch_and_jax

    tm, model = torch_and_jax("resnet18", 10)
    return Wrapped(tm).eval(), model


# --------------------------------------------------------------------------------------
# The paper's two metrics of its own, restated from their description in its lib/metrics.py
# --------------------------------------------------------------------------------------


def infidelity_draws(n: int, samples: int, h: int, w: int, sizes) -> np.ndarray:
    """The values Quantus draws after ``np.random.seed(SEED)``: per sample, patch size and
    row-major patch, one per image: ``(n, samples, patches)``."""
    rs = np.random.RandomState(SEED)
    draws = [rs.uniform(-1.0, 1.0, n) for _ in range(samples) for p in sizes for _ in range((h // p) * (w // p))]
    return np.stack(draws, 1).reshape(n, samples, -1).astype(np.float32)


def monotonicity_draws(n: int, groups: int, samples: int) -> np.ndarray:
    """The values Quantus draws after ``np.random.seed(SEED)``: per group, per sample, one per image."""
    rs = np.random.RandomState(SEED)
    return np.stack([rs.uniform(-1.0, 1.0, n) for _ in range(groups * samples)], 1).reshape(n, groups, samples)


# --------------------------------------------------------------------------------------
# On the converted resnet18: the paper's settings, scaled to 72 pixels
# --------------------------------------------------------------------------------------


def test_infidelity_paper_equals_quantus_with_the_same_draws(resnet):
    tm, model = resnet
    x, t, a = data(2, SIZE, SIZE)
    sizes, samples = (36, 18), 2
    np.random.seed(SEED)
    want = quantus_scores(
        paper_infidelity(n_perturb_samples=samples, perturb_patch_sizes=list(sizes)),
        tm,
        x,
        t,
        a,
    )
    values = infidelity_draws(2, samples, SIZE, SIZE, sizes)
    got = faithfulness.infidelity_paper(model, x, t, a, values=values, patch_sizes=sizes, samples=samples)
    close("infidelity_paper", "the paper's InfidelityOptimalScaling, uniform [-1, 1], 36+18 px, 2 samples", got, want)


def test_faithfulness_correlation_paper_equals_quantus_with_edge_padding(resnet):
    tm, model = resnet
    x, t, a = data(2, 70, 75)  # 70 = 36 + 34, 75 = 2 * 36 + 3: padded (1, 1) and (16, 17) for 36
    want = quantus_scores(paper_correlation(perturb_patch_sizes=[36, 18], abs=True), tm, x, t, a)
    got = faithfulness.faithfulness_correlation_paper(model, x, t, a, patch_sizes=(36, 18))
    close("faithfulness_correlation_paper", "the paper's patches, baseline 0, abs; 36+18 px on 70x75", got, want)


def test_faithfulness_estimate_equals_quantus(resnet):
    tm, model = resnet
    x, t, a = data(2, SIZE, SIZE)
    metric = quantus.FaithfulnessEstimate(features_in_step=324, perturb_baseline=0.0, abs=True, disable_warnings=True)
    want = quantus_scores(metric, tm, x, t, a)
    got = faithfulness.faithfulness_estimate(model, x, t, a, features_in_step=324)
    close("faithfulness_estimate", "features_in_step 324, baseline 0, abs", got, want)


def test_monotonicity_correlation_equals_quantus_with_the_same_draws(resnet):
    tm, model = resnet
    x, t, a = data(2, SIZE, SIZE)
    k, samples = 1296, 3  # 12 groups of 1296 features, 3 uniform values each
    metric = quantus.MonotonicityCorrelation(
        nr_samples=samples,
        features_in_step=k,
        perturb_baseline="uniform",
        perturb_func_kwargs=UNIFORM,
        abs=True,
        eps=1e-12,
        disable_warnings=True,
    )
    np.random.seed(SEED)
    want = quantus_scores(metric, tm, x, t, a)
    values = monotonicity_draws(2, 3 * SIZE * SIZE // k, samples)
    got = faithfulness.monotonicity_correlation(model, x, t, a, features_in_step=k, samples=samples, values=values)
    close("monotonicity_correlation", "uniform [-1, 1], features_in_step 1296, 3 samples, abs, eps 1e-12", got, want)


# --------------------------------------------------------------------------------------
# On the MLP: the explainer metrics (both sides explain with the same function) and other settings
# --------------------------------------------------------------------------------------


def test_max_sensitivity_paper_equals_quantus_with_the_same_noise():
    tm, model = mlp_pair(SIZE, SIZE)
    grad = gradient(model)
    explain = lambda x, t: grad(x, t) * x  # gradient x input: the MLP's gradient alone is piecewise constant
    x, t, _ = data(2, SIZE, SIZE)
    a = np.asarray(explain(x, t))
    metric = quantus.MaxSensitivity(nr_samples=10, lower_bound=0.02, disable_warnings=True)
    np.random.seed(SEED)
    want = quantus_scores(metric, tm, x, t, a, explain_func=quantus_explain(explain))
    rs = np.random.RandomState(SEED)  # per sample: one value per pixel channel, flattened channel-first
    noise = [nhwc(rs.uniform(-0.02, 0.02, (2, 3 * SIZE * SIZE)).reshape(2, 3, SIZE, SIZE)) for _ in range(10)]
    got = metrics.max_sensitivity_paper(explain, x, t, a, None, noise=np.stack(noise).astype(np.float32))
    close("max_sensitivity_paper", "MaxSensitivity(nr_samples=10, lower_bound=0.02), gradient x input", got, want)
    assert (np.asarray(got) > 0).all()


def test_random_logit_paper_equals_quantus_and_draws_its_labels():
    tm, model = mlp_pair(SIZE, SIZE)
    explain = gradient(model)
    x, t, _ = data(3, SIZE, SIZE)
    a = np.asarray(explain(x, t))
    seen = []
    metric = quantus.RandomLogit(
        num_classes=10, seed=42, similarity_func=quantus.similarity_func.correlation_pearson, disable_warnings=True
    )
    want = quantus_scores(metric, tm, x, t, a, explain_func=quantus_explain(explain, seen))
    got = metrics.random_logit_paper(model, explain, x, t, a)
    close("random_logit_paper", "RandomLogit(num_classes=10, seed=42, correlation_pearson), gradient", got, want)
    np.testing.assert_array_equal(metrics.quantus_other_labels(t, 10, 42), seen[0])
    # Quantus reseeds per batch: batches of 2 repeat the first two draws
    many = np.arange(5)
    labels = metrics.quantus_other_labels(many, 10, 42, batch_size=2)
    offsets = np.tile(np.random.RandomState(42).randint(0, 9, 2), 3)[:5]
    np.testing.assert_array_equal(labels, offsets + (offsets >= many))
    assert (labels != many).all()


def test_other_settings_equal_quantus_on_a_small_network():
    tm, model = mlp_pair(SIZE, SIZE)
    x, t, a = data(3, SIZE, SIZE, seed=1)
    # infidelity: three patch sizes, one sample; in chunks of 7 perturbations through the model
    np.random.seed(SEED)
    want = quantus_scores(paper_infidelity(n_perturb_samples=1, perturb_patch_sizes=[72, 24, 12]), tm, x, t, a)
    values = infidelity_draws(3, 1, SIZE, SIZE, (72, 24, 12))
    got = faithfulness.infidelity_paper(model, x, t, a, values=values, patch_sizes=(72, 24, 12), samples=1)
    # INFIDELITY_TOL: the residuals beta <a, I> - drop cancel here (the MLP is nearly linear), so
    # the logits' float32 rounding (1.6e-6 of the drops in jaxpull) shows: measured against a
    # float64 computation, jaxpull is within 1.0e-5 and Quantus within 3.8e-6, each other 1.6e-5
    close("infidelity_paper", "", got, want, INFIDELITY_TOL)
    chunks = faithfulness.infidelity_paper(
        model, x, t, a, values=values, patch_sizes=(72, 24, 12), samples=1, batch_size=7
    )
    np.testing.assert_allclose(chunks, got, rtol=1e-6)
    # faithfulness correlation: no padding, baseline 0.3, signed maps
    want = quantus_scores(paper_correlation(perturb_patch_sizes=[18], abs=False, normalise=False), tm, x, t, a)
    got = faithfulness.faithfulness_correlation_paper(model, x, t, a, patch_sizes=(18,), abs=False)
    close("faithfulness_correlation_paper", "", got, want)
    # faithfulness estimate: a baseline of -0.5 and signed maps
    metric = quantus.FaithfulnessEstimate(
        features_in_step=648, perturb_baseline=-0.5, abs=False, normalise=False, disable_warnings=True
    )
    want = quantus_scores(metric, tm, x, t, a)
    got = faithfulness.faithfulness_estimate(model, x, t, a, features_in_step=648, baseline=-0.5, abs=False)
    close("faithfulness_estimate", "", got, want)
    # monotonicity: a fixed baseline (deterministic: its samples are identical), in chunks
    metric = quantus.MonotonicityCorrelation(
        nr_samples=2, features_in_step=324, perturb_baseline=0.25, abs=True, eps=1e-12, disable_warnings=True
    )
    want = quantus_scores(metric, tm, x, t, a)
    got = faithfulness.monotonicity_correlation(model, x, t, a, features_in_step=324, baseline=0.25, batch_size=10)
    close("monotonicity_correlation", "", got, want)


def test_paper_metrics_properties():
    _, model = mlp_pair(SIZE, SIZE)
    x, t, a = data(2, SIZE, SIZE, seed=2)
    key = jax.random.key(0)
    # infidelity: optimal scaling makes a map and 5 times it score the same; drawn values are reproducible
    one = faithfulness.infidelity_paper(model, x, t, a, key, patch_sizes=(36, 18), samples=2)
    np.testing.assert_allclose(faithfulness.infidelity_paper(model, x, t, 5 * a, key, (36, 18), 2), one, rtol=1e-4)
    assert np.isfinite(one).all() and (np.asarray(one) > 0).all()
    # with 18-pixel patches on 72 pixels, the paper's correlation is jaxpull's 4x4 grid on |a|
    grid = metrics.faithfulness_correlation(model, x, t, np.abs(a), grid=4)
    np.testing.assert_allclose(faithfulness.faithfulness_correlation_paper(model, x, t, a, (18,)), grid, atol=1e-5)


def test_ties_are_ranked_as_numpys_stable_sort(monkeypatch):
    """Maps with exact ties (zeros): jaxpull ranks them by channel-first index, which is Quantus'
    ranking when numpy's argsort is stable (its default sort leaves the order of ties open)."""
    tm, model = mlp_pair(SIZE, SIZE)
    x, t, a = data(2, SIZE, SIZE, seed=4)
    a = np.where(np.abs(a) < 1.0, 0.0, np.round(a)).astype(np.float32)  # 2/3 zeros, the rest integers
    argsort = np.argsort
    monkeypatch.setattr(np, "argsort", lambda v, axis=-1, kind=None, order=None: argsort(v, axis, kind="stable"))
    metric = quantus.FaithfulnessEstimate(features_in_step=324, perturb_baseline=0.0, abs=True, disable_warnings=True)
    got = faithfulness.faithfulness_estimate(model, x, t, a, features_in_step=324)
    close("faithfulness_estimate", "", got, quantus_scores(metric, tm, x, t, a))
    metric = quantus.MonotonicityCorrelation(
        nr_samples=1, features_in_step=324, perturb_baseline=-0.5, abs=True, eps=1e-12, disable_warnings=True
    )
    got = faithfulness.monotonicity_correlation(model, x, t, a, features_in_step=324, baseline=-0.5)
    close("monotonicity_correlation", "", got, quantus_scores(metric, tm, x, t, a))


def test_focus_equals_quantus_and_the_channel_sum_differs():
    rng = np.random.default_rng(1)
    quadrants = np.array([[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 0, 1], [0, 1, 1, 0]])
    for h, w in [(SIZE, SIZE), (45, 51)]:  # odd sizes: Quantus splits at H // 2 and W // 2
        x = rng.uniform(-1, 1, (6, h, w, 3)).astype(np.float32)
        a = rng.normal(size=x.shape).astype(np.float32)
        metric = quantus.Focus(abs=False, normalise=False, return_aggregate=False, disable_warnings=True)
        # the paper's call: relevance x * a with its channels, the quadrant flags as custom_batch
        want = quantus_scores(metric, torch.nn.Identity(), x, np.zeros(6, int), x * a, custom_batch=quadrants)
        got = metrics.focus(a, x, quadrants.astype(bool))
        close("focus", "Focus(abs=False, normalise=False) on x * a; 72x72 and 45x51", got, want, 1e-6)
        summed = metrics.focus(a, x, quadrants.astype(bool), variant="channel_sum")
        assert np.abs(np.asarray(summed) - want).max() > 1e-3  # clipping before or after the channel sum
    # no positive relevance: NaN by default, Quantus' 0 on request
    zero = np.zeros((1, 4, 4, 3), np.float32)
    flags = np.array([[True, True, False, False]])
    assert np.isnan(metrics.focus(zero, zero + 0.5, flags)[0])
    assert metrics.focus(zero, zero + 0.5, flags, undefined=0.0)[0] == 0.0


def test_paper_mosaics_follow_the_papers_draws_and_torch_resizing():
    from quantus.functions.mosaic_func import build_single_mosaic

    rng = np.random.default_rng(2)
    classes = np.array([3, 1, 3, 5, 1, 8, 5, 3])
    images = rng.uniform(-1, 1, (8, 40, 40, 3)).astype(np.float32)
    m = mosaics.make_paper_mosaics(images, classes, 6, seed=314, tile=16)
    assert m.images.shape == (6, 32, 32, 3)
    # the draws of the paper's evaluate_focus.py in its order, restated from its description
    draw = np.random.default_rng(314)
    labels = np.array(sorted(set(classes.tolist())))
    for i in range(6):
        target = int(draw.choice(labels))
        others = draw.choice(labels[labels != target], size=2, replace=True)
        own = int(draw.choice(np.flatnonzero(classes == target).tolist()))
        fill = [int(draw.choice(np.flatnonzero(classes == o).tolist())) for o in others]
        where = set(draw.choice(4, size=2, replace=False).tolist())
        order = [own if q in where else fill.pop(0) for q in range(4)]
        assert m.targets[i] == target and m.quadrants[i].tolist() == [q in where for q in range(4)]
        assert m.sources[i].tolist() == order
        # each tile: torch's antialiased bilinear resize; placed as Quantus' build_single_mosaic does
        tiles = torch.nn.functional.interpolate(
            torch.from_numpy(nchw(images[order])), size=(16, 16), mode="bilinear", align_corners=False, antialias=True
        ).numpy()
        np.testing.assert_allclose(m.images[i], build_single_mosaic(list(tiles)).transpose(1, 2, 0), atol=1e-6)
    import torchvision.transforms.functional as TF

    for size in (16, 57):  # shrinking and enlarging, as torchvision's resize of a tensor
        want = TF.resize(torch.from_numpy(nchw(images[:2])), [size, size], antialias=True).numpy()
        np.testing.assert_allclose(nchw(mosaics.resize_tiles(jnp.asarray(images[:2]), size)), want, atol=1e-6)
    # the original Focus paper's variant: two different images of the target class
    pairs = np.array([3, 1, 3, 5, 1, 5, 5, 3])  # every class has two images or more
    m2 = mosaics.make_paper_mosaics(images, pairs, 20, tile=8, distinct_images=True)
    for q, src, target in zip(m2.quadrants, m2.sources, m2.targets, strict=True):
        assert src[q][0] != src[q][1] and (pairs[src[q]] == target).all() and (pairs[src[~q]] != target).all()


# --------------------------------------------------------------------------------------
# Bad settings: one-line errors naming the setting
# --------------------------------------------------------------------------------------


def test_bad_settings_are_one_line_errors():
    _, model = mlp_pair(8, 8)
    x, t, a = data(2, 8, 8)
    _, model1 = mlp_pair(1, 1)
    x1, _, a1 = data(2, 1, 1)
    key = jax.random.key(0)
    explain = lambda xx, tt: jnp.zeros_like(xx)
    F = faithfulness
    quadrants = np.array([[True, True, False, False]] * 2)
    images = np.zeros((4, 8, 8, 3), np.float32)
    cases = [
        # mosaics
        (lambda: mosaics.make_mosaics(np.zeros((4, 7, 8, 3), np.float32), [0, 1, 2, 3], 2), "even H and W"),
        (lambda: mosaics.make_paper_mosaics(images, [0, 1, 2, 3], 0), "number of mosaics"),
        (lambda: mosaics.make_paper_mosaics(images, [0, 0, 0, 0], 2), "at least 2 distinct classes"),
        (lambda: mosaics.make_paper_mosaics(images, [0, 1, 2], 2), "one class per image"),
        (lambda: mosaics.make_paper_mosaics(np.zeros((4, 1, 1, 3), np.float32), [0, 1, 2, 3], 2), "2x2"),
        (lambda: mosaics.make_paper_mosaics(images, [0, 1, 2, 3], 2, tile=0), "tile"),
        (lambda: mosaics.make_paper_mosaics(images, [0, 1, 1, 2], 2, distinct_images=True), "class 0 has one"),
        (lambda: mosaics.make_paper_mosaics(images, [0.5, 1, 1, 2], 2), "integer"),
        # focus
        (lambda: metrics.focus(a1, x1, quadrants), "at least 2x2"),
        (lambda: metrics.focus(a, x, quadrants, variant="sum"), "unknown Focus variant"),
        # the paper's faithfulness metrics
        (lambda: F.infidelity_paper(model, x, t, a, key, patch_sizes=(3,)), "does not split into 3-pixel"),
        (lambda: F.infidelity_paper(model, x, t, a, key, patch_sizes=(4,), samples=0), "samples"),
        (lambda: F.infidelity_paper(model, x, t, a, key, (4,), samples=float("nan")), "samples"),
        (lambda: F.infidelity_paper(model, x, t, a, key, (4,), low=1e300), "low must be finite"),
        (lambda: F.infidelity_paper(model, x, t, a, key, (4,), low=1.0, high=-1.0), "low <= high"),
        (lambda: F.infidelity_paper(model, x, t, a, None, (4,)), "key"),
        (lambda: F.infidelity_paper(model, x, t, a, values=np.zeros((2, 5, 3)), patch_sizes=(4,)), "values"),
        (lambda: F.infidelity_paper(model, x, t, a, key, patch_sizes=()), "patch_sizes is empty"),
        (lambda: F.infidelity_paper(model1, x1, t, a1, key), "1x1 image does not split"),
        (lambda: F.faithfulness_correlation_paper(model1, x1, t, a1), "single patch"),
        (lambda: F.faithfulness_correlation_paper(model, x, t, a, (4,), baseline=np.inf), "baseline must be finite"),
        (lambda: F.faithfulness_estimate(model, x, t, a, features_in_step=5), "must divide H * W"),
        (lambda: F.faithfulness_estimate(model1, x1, t, a1), "features_in_step=3136 must divide"),
        (lambda: F.monotonicity_correlation(model, x, t, a, key, 16, baseline="black"), "unknown baseline"),
        (lambda: F.monotonicity_correlation(model, x, t, a, key, 16, samples=0), "samples"),
        (lambda: F.monotonicity_correlation(model, x, t, a, key, 16, eps=float("nan")), "eps"),
        (lambda: F.monotonicity_correlation(model, x, t, a, key, 16, batch_size=0), "batch_size"),
        (lambda: F.monotonicity_correlation(model, x, t, a, key, 16, 2, 0.0, values=np.zeros((2, 12, 2))), "values"),
        # explainer metrics and the earlier ones
        (lambda: metrics.max_sensitivity(explain, x, t, a, key, radius=1e300), "radius must be positive and finite"),
        (lambda: metrics.max_sensitivity(explain, x, t, a, key, samples=0), "samples"),
        (lambda: metrics.max_sensitivity_paper(explain, x, t, a, None), "key"),
        (lambda: metrics.max_sensitivity_paper(explain, x, t, a, None, noise=np.zeros((2, 8, 8, 3))), "noise"),
        (lambda: metrics.infidelity(model, x, t, a, key, sigma=1e300), "sigma must be positive and finite"),
        (lambda: metrics.infidelity(model, x, t, a, key, samples=0), "samples"),
        (lambda: metrics.random_logit_paper(model, explain, x, t, a, num_classes=11), "num_classes must be in [2, 10]"),
        (lambda: metrics.random_logit_paper(model, explain, x, t, a, num_classes=1), "num_classes must be a whole"),
        (lambda: metrics.random_logit_paper(model, explain, x, np.array([1, 7]), a, num_classes=5), "out of range"),
        (lambda: metrics.random_logit(explain, x, t, a, 1), "num_classes must be a whole number >= 2"),
    ]
    failures = []
    for i, (call, fragment) in enumerate(cases):
        try:
            call()
        except ValueError as e:
            if "\n" in str(e) or fragment not in str(e):
                failures.append(f"case {i}: {str(e)!r} (wanted {fragment!r})")
        else:
            failures.append(f"case {i}: no error (wanted {fragment!r})")
    assert not failures, "\n".join(failures)
