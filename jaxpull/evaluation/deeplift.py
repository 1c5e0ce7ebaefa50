"""DeepLift with the rescale rule, as Captum 0.9.0 computes it (``captum.attr.DeepLift``, Shrikumar et
al. 2017), under any backward rules.

Captum runs the model once on the images and the baseline stacked into one batch, and overrides the
backward pass of every module whose type is one of its nonlinearities with a multiplier:

* ``nn.ReLU`` (also ``ELU``, ``Sigmoid``, ``Tanh``, ...): ``g * (f(x) - f(x0)) / (x - x0)``, ``x`` and
  ``x0`` the module's inputs for the image and for the baseline; where ``|x - x0| < 1e-10`` the
  module's ordinary gradient;
* ``nn.MaxPool2d``: with ``y = pool(x)``, ``y0 = pool(x0)``, ``m = max(y, y0)``, the image's cotangent
  times ``m - y0`` is put on the image's argmax of each window and the baseline's cotangent times
  ``y - m`` on the baseline's argmax, and the sum divided by ``x - x0`` (the ordinary max-pool
  gradient where ``|x - x0| < 1e-10``).

The attribution is ``(x - x0)`` times the gradient this backward pass gives. Every other operation
keeps its derivative; in particular Captum has no rule for ``nn.ReLU6``, ``nn.GELU``, ``nn.SiLU`` or
``nn.Hardswish`` (their exact gradient is used) and none for functional calls (``F.relu``).

jaxpull's :func:`deeplift` does the same through the rules: each ReLU (not ReLU6) and each max-pool
whose rule is ``plain`` gets the multiplier above (the subclasses :class:`RescaleReLU` and
:class:`RescaleMaxPool` of the rules); a layer whose rule is not plain keeps its rule. That is what
Captum computes on the paper's models with the rules switched on ("PbDeepLift"): the paper swaps each
``nn.ReLU`` / ``nn.MaxPool2d`` module's class for a surrogate subclass, and Captum's test is on the
exact type, so it leaves the surrogates alone and their soft backward runs. Under the ``"semantic"``
rules no ReLU or max-pool rule is plain, so PbDeepLift is ``(x - x0) * pullback``.

Where jaxpull and Captum differ, jaxpull is the one that satisfies DeepLift's summation property:

* Captum hooks a tensor twice where an ``nn.ReLU``'s output goes straight into an ``nn.MaxPool2d``
  (VGG, AlexNet, ResNet's stem): the ReLU's hook records the gradient before the max-pool's hook
  replaces it (tensor hooks run in the order they were registered), so the ReLU's multiplier is
  applied to the plain max-pool gradient and the max-pool multiplier is lost; its maps then do not
  add up (a random VGG11 at 64 px: cosine 0.968 to jaxpull's, largest error 28%). With any module
  between the two (a clone) Captum computes the rule, and equals jaxpull (tests/test_explainers_captum.py);
* jaxpull applies the rule to every ReLU and max-pool, functional ones too (DenseNet's last ReLU,
  GoogLeNet's and Inception-v3's); Captum only to modules, and it rejects a module used twice
  (torchvision's ResNet blocks reuse one ``nn.ReLU``: Captum's DeepLift raises on ResNet);
* Captum puts the max-pool's contributions back with ``max_unpool2d``, which keeps one of two
  contributions to the same input element (overlapping windows: ResNet's 3x3/2 stem pool);
  jaxpull adds them. With non-overlapping windows (VGG's 2x2/2) the two are the same;
* Captum's max-pool fallback takes the first image's gradient for every row of the stacked batch
  (``grad_input[0]``); jaxpull each row's own (after a rescaled ReLU the fallback meets a zero
  multiplier, so this shows only when the ReLU before the max-pool has another rule);
* ``nn.Sigmoid`` / ``nn.Tanh`` / ``nn.Softmax`` modules (the squeeze-excitation sigmoid of EfficientNet
  and RegNetY) get Captum's multiplier there and their exact gradient here.

The paper's own "DeepLift" column is neither: its evaluation swaps every ReLU and max-pool for a
surrogate class before any explainer runs (``standard_backward=True`` for the baselines), so Captum
finds no module to hook and its DeepLift is gradient times input (``gradient_x_input``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxpull.core import lowering
from jaxpull.core.model import Model
from jaxpull.core.rules import MaxPool, ReLU, Rules
from jaxpull.core.rules.base import validated
from jaxpull.core.rules.max_pool import hard_max_pool, pool_output_size, window_values
from jaxpull.evaluation import attribution

# Captum's DeepLift(eps=1e-10): where the input moves less than this, the ordinary gradient is used.
EPS = 1e-10


def _halves(a: jax.Array):
    """The image half and the baseline half of a stacked batch ``(2N, ...)``."""
    n = a.shape[0] // 2
    return a[:n], a[n:]


def _twice(a: jax.Array) -> jax.Array:
    return jnp.concatenate([a, a])


@jax.custom_vjp
def _rescale_relu(z: jax.Array) -> jax.Array:
    return jnp.maximum(z, 0)


def _rescale_relu_fwd(z):
    return jnp.maximum(z, 0), z


def _rescale_relu_bwd(z, g):
    zi, z0 = _halves(z)
    dz = zi - z0
    small = jnp.abs(dz) < EPS
    ratio = (jnp.maximum(zi, 0) - jnp.maximum(z0, 0)) / jnp.where(small, 1.0, dz)
    return (jnp.where(_twice(small), g * (z > 0), g * _twice(ratio)),)


_rescale_relu.defvjp(_rescale_relu_fwd, _rescale_relu_bwd)


def _pads(shape, window: int, stride: int, padding: int, ceil_mode: bool):
    """The windows' padding, ceil mode's extra rows and columns included (as the max-pool rule pads)."""
    pads = []
    for size in shape[1:3]:
        out = pool_output_size(size, window, stride, padding, ceil_mode)
        pads.append((padding, padding + max((out - 1) * stride + window - (size + 2 * padding), 0)))
    return tuple(pads)


def _argmax_one_hot(x: jax.Array, window: int, stride: int, padding: int, ceil_mode: bool) -> jax.Array:
    """One-hot of each window's first largest value (torch's index; padding never wins):
    ``(N, Ho, Wo, C, window * window)``."""
    v = window_values(x, window, stride, padding, ceil_mode)
    inside = window_values(jnp.ones(x.shape[:3] + (1,), x.dtype), window, stride, padding, ceil_mode) > 0
    v = jnp.where(inside, v, -jnp.inf)
    return jax.nn.one_hot(jnp.argmax(v, axis=-1), window * window, dtype=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _rescale_max_pool(x, window, stride, padding, ceil_mode):
    return hard_max_pool(x, window, stride, padding, ceil_mode)


def _rescale_max_pool_fwd(x, window, stride, padding, ceil_mode):
    return hard_max_pool(x, window, stride, padding, ceil_mode), x


def _rescale_max_pool_bwd(window, stride, padding, ceil_mode, x, g):
    """Captum's multiplier: ``(scatter(g_x * (m - y0), argmax x) + scatter(g_0 * (y - m), argmax x0)) / (x - x0)``
    for both halves (``g_x``, ``g_0``: the cotangents of the image and the baseline half); where
    ``|x - x0| < EPS`` each half's own plain max-pool gradient."""
    (xi, x0), (gi, g0) = _halves(x), _halves(g)
    yi = hard_max_pool(xi, window, stride, padding, ceil_mode)
    y0 = hard_max_pool(x0, window, stride, padding, ceil_mode)
    top = jnp.maximum(yi, y0)
    hot_i = _argmax_one_hot(xi, window, stride, padding, ceil_mode)
    hot_0 = _argmax_one_hot(x0, window, stride, padding, ceil_mode)
    shape = hot_i.shape[:4] + (window, window)
    pads = _pads(xi.shape, window, stride, padding, ceil_mode)
    scatter = lambda cot, w: lowering.scatter_views(cot, w.reshape(shape), stride, pads, xi.shape[1:3])
    moved = scatter(gi, hot_i * (top - y0)[..., None]) + scatter(g0, hot_0 * (yi - top)[..., None])
    dx = xi - x0
    small = jnp.abs(dx) < EPS
    ratio = moved / jnp.where(small, 1.0, dx)
    out_i = jnp.where(small, scatter(gi, hot_i), ratio)
    out_0 = jnp.where(small, scatter(g0, hot_0), ratio)
    return (jnp.concatenate([out_i, out_0]).astype(x.dtype),)


_rescale_max_pool.defvjp(_rescale_max_pool_fwd, _rescale_max_pool_bwd)


@validated
class RescaleReLU(ReLU):
    """A ReLU rule that, where its mode is ``plain``, is DeepLift's rescale rule on a stacked batch
    (images, then baselines): ``g * (relu(x) - relu(x0)) / (x - x0)``. ReLU6 and the other modes
    keep the rule (Captum has no ReLU6 rule, and leaves the paper's surrogate modules alone)."""

    def __call__(self, z: jax.Array, max_value: float | None = None) -> jax.Array:
        if self.mode == "plain" and max_value is None:
            return _rescale_relu(z)
        return super().__call__(z, max_value)


@validated
class RescaleMaxPool(MaxPool):
    """A max-pool rule that, where its mode is ``plain``, is Captum's DeepLift max-pool rule on a
    stacked batch (images, then baselines); the other modes keep the rule."""

    def __call__(self, x: jax.Array, window: int, stride: int, padding: int, ceil_mode: bool = False) -> jax.Array:
        if self.mode == "plain":
            return _rescale_max_pool(x, window, stride, padding, ceil_mode)
        return super().__call__(x, window, stride, padding, ceil_mode)


def as_rule(cls, rule):
    """``rule``'s settings in a rule object of ``cls`` (a subclass of its class)."""
    return cls(**{f.name: getattr(rule, f.name) for f in dataclasses.fields(rule)})


def deeplift_rules(rules: Rules) -> Rules:
    """``rules`` with DeepLift's multipliers on the plain ReLUs and max-pools (a stacked batch)."""
    return rules.replace(relu=as_rule(RescaleReLU, rules.relu), max_pool=as_rule(RescaleMaxPool, rules.max_pool))


@jax.jit
def deeplift_core(model: Model, x: jax.Array, targets: jax.Array, rules: Rules, baseline: jax.Array) -> jax.Array:
    """DeepLift: ``(x - x0) *`` the gradient of each target logit through the images and the
    baseline ``x0`` (a scalar, every pixel) stacked into one batch, with :func:`deeplift_rules`:
    ``(N, H, W, 3)``, ``(N, K)`` -> ``(N, K, H, W, 3)``."""
    n = x.shape[0]
    ref = jnp.full_like(x, baseline)
    _, vjp = jax.vjp(lambda both: model.apply(both, deeplift_rules(rules)), jnp.concatenate([x, ref]))
    cot = jax.nn.one_hot(targets.T, model.num_classes, dtype=jnp.float32)  # (K, N, C), the target in both halves
    (grads,) = jax.vmap(vjp)(jnp.concatenate([cot, cot], axis=1))
    return jnp.swapaxes(grads[:, :n], 0, 1) * (x - ref)[:, None]


def deeplift(
    model: Model,
    x,
    targets,
    *,
    baseline: float = 0.0,
    rules: Rules | str = attribution.BASELINE_RULES,
    **overrides,
) -> jax.Array:
    """DeepLift (rescale rule) from a baseline of ``baseline`` everywhere (0: mid-grey, as Quantus
    passes Captum ``torch.zeros_like(inputs)``), under ``rules`` (see the module docstring):
    ``(N, K, H, W, 3)``."""
    x, t, r = attribution.prepare(model, x, targets, rules, overrides)
    return deeplift_core(model, x, t, r, jnp.float32(attribution.baseline_value(baseline)))
