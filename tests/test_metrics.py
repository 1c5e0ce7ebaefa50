"""The metrics on tiny cases whose values are computed by hand (in the comments)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpull.evaluation import metrics

# less codegen effort: each function runs once or twice, on small inputs (conftest.py)
pytestmark = pytest.mark.quick_compile


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LinearModel:
    """logits = einsum(x, w): ``w`` ``(C, H, W, 3)``; a stand-in with ``apply`` like ``Model``."""

    w: jax.Array

    def apply(self, x, rules=None):
        return jnp.einsum("nhwc,khwc->nk", x, self.w)


def test_pearson_and_spearman_by_hand():
    # a - mean = [-1, 0, 1], b - mean = [-7/3, -1/3, 8/3]: r = 5 / (sqrt(2) * sqrt(38/3)) = 0.993399
    assert float(metrics.pearson(jnp.array([1.0, 2, 3]), jnp.array([2.0, 4, 7]))) == pytest.approx(0.993399, abs=1e-6)
    assert np.isnan(float(metrics.pearson(jnp.ones(3), jnp.arange(3.0))))  # constant: undefined
    # ranks [0, 2, 1, 3] vs [0, 1, 2, 3]: rho = 1 - 6 * 2 / (4 * 15) = 0.8
    r = metrics.spearman(jnp.array([[1.0, 3, 2, 4]]), jnp.array([[10.0, 20, 30, 40]]))
    assert float(r[0]) == pytest.approx(0.8, abs=1e-6)
    # ties share the mean rank: [0.5, 0.5, 2] vs [0, 1, 2]: r = 1.5 / sqrt(1.5 * 2) = 0.866025
    r = metrics.spearman(jnp.array([[1.0, 1, 2]]), jnp.array([[1.0, 2, 3]]))
    assert float(r[0]) == pytest.approx(0.866025, abs=1e-6)


def test_ssim_by_hand_and_against_scikit_image():
    # one 7x7 window, constants 0 and 1: (c1) * (c2) / ((1 + c1) * c2) = 1e-4 / (1 + 1e-4)
    s = metrics.ssim(jnp.zeros((1, 7, 7)), jnp.ones((1, 7, 7)))
    assert float(s[0]) == pytest.approx(1e-4 / 1.0001, rel=1e-4)
    rng = np.random.default_rng(0)
    a, b = rng.random((2, 16, 20)).astype(np.float32)
    assert float(metrics.ssim(jnp.asarray(a[None]), jnp.asarray(a[None]))[0]) == pytest.approx(1.0, abs=1e-6)
    structural_similarity = pytest.importorskip("skimage.metrics").structural_similarity
    expected = structural_similarity(a, b, data_range=1.0)
    assert float(metrics.ssim(jnp.asarray(a[None]), jnp.asarray(b[None]))[0]) == pytest.approx(expected, abs=1e-5)


def test_focus_by_hand():
    x = jnp.ones((1, 4, 4, 3))
    a = np.zeros((1, 4, 4, 3), np.float32)
    a[0, :2, :2], a[0, :2, 2:], a[0, 2:, :2], a[0, 2:, 2:] = 1.0, -2.0, 3.0, 0.5
    # pixel relevance = 3 * a: positive sums per quadrant 12, 0, 36, 6 (total 54)
    target_left = jnp.array([[True, False, True, False]])  # top-left and bottom-left: 48 / 54
    assert float(metrics.focus(jnp.asarray(a), x, target_left)[0]) == pytest.approx(48 / 54)
    target_right = jnp.array([[False, True, False, True]])  # 6 / 54
    assert float(metrics.focus(jnp.asarray(a), x, target_right)[0]) == pytest.approx(6 / 54)
    # relevance is x * a: flipping x's sign flips which pixels count
    assert float(metrics.focus(jnp.asarray(a), -x, target_right)[0]) == pytest.approx(1.0)
    assert np.isnan(float(metrics.focus(jnp.zeros((1, 4, 4, 3)), x, target_left)[0]))


def test_mosaics_put_two_target_tiles_and_two_other_classes():
    colors = np.array([-0.9, -0.3, 0.3, 0.9], np.float32)
    images = np.broadcast_to(colors[:, None, None, None], (4, 8, 8, 3)).copy()
    classes = np.array([0, 1, 2, 0])  # class 0 has two images
    m = metrics.make_mosaics(images, classes, 9, seed=1)
    assert m.images.shape == (9, 8, 8, 3) and m.quadrants.sum(1).tolist() == [2] * 9
    for img, target, quad, src in zip(m.images, m.targets, m.quadrants, m.sources, strict=True):
        tiles = [img[:4, :4], img[:4, 4:], img[4:, :4], img[4:, 4:]]
        for tile, s in zip(tiles, src, strict=True):
            assert np.allclose(tile, colors[s])  # each 4x4 tile is its source image shrunk
        assert (classes[src[quad]] == target).all()
        others = classes[src[~quad]]
        assert len(set(others)) == 2 and target not in others
    assert sorted(set(m.targets.tolist())) == [0, 1, 2]  # target classes cycle
    # averaging 2x2 blocks: a checkerboard of +-1 becomes a grey tile
    board = np.indices((8, 8)).sum(0) % 2 * 2.0 - 1
    imgs = np.stack([np.repeat(board[..., None], 3, -1)] + list(images[1:3])).astype(np.float32)
    m = metrics.make_mosaics(imgs, [0, 1, 2], 1, seed=0)
    assert np.allclose(m.images[0][np.repeat(np.repeat(m.sources[0].reshape(2, 2) == 0, 4, 0), 4, 1)], 0.0)
    with pytest.raises(ValueError, match="at least 3 distinct classes"):
        metrics.make_mosaics(images, [0, 1, 0, 1], 2)


def test_faithfulness_correlation_by_hand():
    # f(x) = sum(w * x), 4x4 image, 2x2 grid: zeroing patch p drops f by the sum of w * x over p.
    w = np.zeros((1, 4, 4, 3), np.float32)
    w[0, :2, :2], w[0, :2, 2:], w[0, 2:, :2], w[0, 2:, 2:] = 1.0, 2.0, 0.0, -1.0
    model = LinearModel(jnp.asarray(w))
    x = jnp.full((1, 4, 4, 3), 0.5)
    t = jnp.array([0])
    # drops: 12 * 0.5 * [1, 2, 0, -1] = [6, 12, 0, -6]; gradient x input has the same patch sums
    r = metrics.faithfulness_correlation(model, x, t, model.w * x, grid=2)
    assert float(r[0]) == pytest.approx(1.0, abs=1e-6)
    assert float(metrics.faithfulness_correlation(model, x, t, -model.w * x, grid=2)[0]) == pytest.approx(
        -1.0, abs=1e-6
    )
    # attribution with patch sums [12, 0, 0, 0] (all in the top-left patch):
    # pearson([12, 0, 0, 0], [6, 12, 0, -6]) = (9 * 3 - 3 * 9 - 3 * -3 - 3 * -9) / (sqrt(108) * sqrt(180)) = 36 / 139.42
    a = np.zeros((1, 4, 4, 3), np.float32)
    a[0, 0, 0, 0] = 12.0
    got = float(metrics.faithfulness_correlation(model, x, t, jnp.asarray(a), grid=2)[0])
    assert got == pytest.approx(36 / np.sqrt(108 * 180), abs=1e-6)
    with pytest.raises(ValueError, match="grid"):
        metrics.patch_masks(5, 4, 2)


def test_infidelity_is_zero_for_the_exact_linear_attribution_and_scale_free():
    rng = np.random.default_rng(0)
    model = LinearModel(jnp.asarray(rng.normal(size=(2, 4, 4, 3)).astype(np.float32)))
    x = jnp.asarray(rng.uniform(-1, 1, (2, 4, 4, 3)).astype(np.float32))
    t = jnp.array([0, 1])
    key = jax.random.key(0)
    exact = model.w[t]  # I . w == f(x) - f(x - I) for every perturbation I
    assert np.allclose(metrics.infidelity(model, x, t, exact, key), 0.0, atol=1e-9)
    assert np.allclose(metrics.infidelity(model, x, t, 7.0 * exact, key), 0.0, atol=1e-9)  # optimal scaling
    other = jnp.asarray(rng.normal(size=(2, 4, 4, 3)).astype(np.float32))
    bad = metrics.infidelity(model, x, t, other, key)
    assert (bad > 1e-3).all()
    assert np.allclose(metrics.infidelity(model, x, t, 3.0 * other, key), bad, rtol=1e-4)
    # by hand for one perturbation: drop d = I.w, e = I.a, beta = (e d) / e^2, infidelity = (beta e - d)^2 = 0
    assert np.allclose(metrics.infidelity(model, x, t, other, key, samples=1), 0.0, atol=1e-6)


def test_max_sensitivity():
    x = jnp.ones((2, 4, 4, 3))
    t = jnp.array([0, 0])
    constant = lambda xx, tt: jnp.ones_like(xx)  # a map that ignores x is not sensitive
    assert np.allclose(metrics.max_sensitivity(constant, x, t, jnp.ones_like(x), jax.random.key(0)), 0.0)
    # a(x) = x: the change is the noise itself, ||d|| / ||x|| <= radius * sqrt(D) / sqrt(D) = radius
    identity = lambda xx, tt: xx
    s = metrics.max_sensitivity(identity, x, t, x, jax.random.key(0), radius=0.1, samples=5)
    assert ((s > 0.05) & (s <= 0.1)).all()  # uniform noise: E[d^2] = r^2 / 3, so about 0.058
    assert float(s[0]) == pytest.approx(0.1 / np.sqrt(3), rel=0.3)


def test_random_logit_is_one_when_the_map_ignores_the_class():
    w = np.random.default_rng(0).normal(size=(5, 8, 8, 3)).astype(np.float32)
    same = LinearModel(jnp.asarray(np.repeat(w[:1], 5, 0)))
    x = jnp.zeros((2, 8, 8, 3))
    t = jnp.array([0, 3])
    grad = lambda m: lambda xx, tt: m.w[tt]  # the gradient of a linear model
    assert np.allclose(metrics.random_logit(grad(same), x, t, same.w[t], 5), 1.0, atol=1e-5)
    different = LinearModel(jnp.asarray(w))
    assert (metrics.random_logit(grad(different), x, t, different.w[t], 5) < 0.5).all()
    others = metrics.other_labels(np.array([0, 3, 4] * 100), 5)
    assert (others != np.array([0, 3, 4] * 100)).all() and set(others.tolist()) == {0, 1, 2, 3, 4}


def test_cascading_randomization(tiny_model):
    order = metrics.layer_order(tiny_model)
    assert order[0] == ("conv1",) and order[-1] == ("fc",) and len(order) == 1 + 8 * 2 + 3 + 1
    randomized = metrics.randomize_layers(tiny_model, [("fc",)], jax.random.key(0))
    assert not np.allclose(randomized.params["fc"]["kernel"], tiny_model.params["fc"]["kernel"])
    assert np.array_equal(randomized.params["conv1"]["kernel"], tiny_model.params["conv1"]["kernel"])
    # each tensor: its mean + its std * jax.random.normal(key, its shape), whatever the bucketing
    for shape in [(), (7,), (3, 3, 5, 6)]:
        v = jnp.asarray(np.random.default_rng(1).normal(2.0, 3.0, shape).astype(np.float32))
        k = jax.random.key(5)
        std = jnp.std(v) if v.size > 1 else jnp.abs(v)
        np.testing.assert_allclose(
            metrics._redraw(v, k), jnp.mean(v) + std * jax.random.normal(k, shape), rtol=1e-5, atol=1e-5
        )
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32))
    t = np.array([1, 2])
    from jaxpull.evaluation import explainers

    grad = lambda m, xx, tt: explainers.gradient(m, xx, tt[:, None])[:, 0]
    names, rho = metrics.model_randomization(grad, tiny_model, x, t, grad(tiny_model, x, t), jax.random.key(0), 3)
    assert names[-1] == "conv1" and rho.shape == (3, 2) and (np.abs(rho) <= 1).all()
    assert (rho[-1] < 0.9).all()  # the gradient changes when the weights do
    # a "map" that ignores the model fails the check: correlation 1 at every step
    edge = lambda m, xx, tt: jnp.abs(xx)
    _, rho = metrics.model_randomization(edge, tiny_model, x, t, jnp.abs(x), jax.random.key(0), 3)
    assert np.allclose(rho, 1.0)
