"""GradCAM-style explainers: Guided GradCAM as Captum 0.9.0 defines it, under any backward rules.

* GradCAM (Selvaraju et al. 2017; Captum's ``LayerGradCam``): ``A`` the activation of a layer
  ``(N, h, w, C)``, ``w_c`` the spatial mean of the target logit's gradient with respect to ``A_c``;
  the map is ``relu(sum_c w_c A_c)`` ``(N, h, w)`` (``relu_attributions=True`` in Guided GradCAM).
* Guided Backprop (Springenberg et al. 2015; Captum's ``GuidedBackprop``): the gradient with every
  ReLU's backward followed by a clamp of its gradient to ``>= 0`` (Captum hooks each ``nn.ReLU``
  module and replaces its input gradient by ``relu(grad)``).
* Guided GradCAM (Captum's ``GuidedGradCam``): Guided Backprop times the GradCAM map upsampled to
  the image with ``F.interpolate(mode="nearest")``, broadcast over the three channels.

Under rules (``rules=``, the paper's "GuidedPbCam" with ``"semantic"``) the GradCAM gradient is the
gradient under the rules and Guided Backprop clamps each ReLU's *ruled* gradient: the paper's
surrogate ReLU is a subclass of ``nn.ReLU``, so Captum's hook still clamps after its soft gate. Under
``"vanilla"`` that is Guided Backprop itself. jaxpull clamps ReLU6 too (its Guided Backprop rule,
``docs/method.md``) and functional ReLUs; Captum only ``nn.ReLU`` modules.

The layer: each architecture family declares its default (``Family.gradcam_layer``: the paper's ResNet
``layer4[-1].conv3``, VGG's ``avgpool``, ...); ``layer=`` overrides it with a module path of jaxpull's
parameter tree, written with dots or slashes (``"layer4.1.conv2"``, ``"layer4/1/conv2"``,
``"features_18"``) and torchvision's spelling (``"layer4[-1].conv2"``, ``"features.18"``: a negative
index counts from the last numbered child *jaxpull* has, which skips torch's parameter-free modules),
or a :class:`GradCamLayer`. The activation is the module's output, read with
``flax.linen.intercept_methods`` (the models are unchanged). jaxpull folds each BatchNorm into the
convolution before it, so a convolution's output is torch's BatchNorm output (``bnN``); for torch's
``convN`` before it, pass ``GradCamLayer("layer4.1.conv2", before_batchnorm=True)``.
"""

from __future__ import annotations

import collections
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxpull.core import models, pullback as method
from jaxpull.core.model import Model, ModelSpec
from jaxpull.core.models.family import GradCamLayer
from jaxpull.core.rules import ReLU, Rules
from jaxpull.core.rules.base import validated
from jaxpull.evaluation import attribution
from jaxpull.evaluation.deeplift import as_rule

Path = tuple[str, ...]


# --------------------------------------------------------------------------------------
# Guided Backprop under any rules
# --------------------------------------------------------------------------------------


@jax.custom_vjp
def _clamp_cotangent(z: jax.Array) -> jax.Array:
    return z


_clamp_cotangent.defvjp(lambda z: (z, None), lambda _, g: (jnp.maximum(g, 0),))


@validated
class ClampedReLU(ReLU):
    """A ReLU rule whose backward is the rule's, then Guided Backprop's clamp: ``max(rule's grad, 0)``."""

    def __call__(self, z: jax.Array, max_value: float | None = None) -> jax.Array:
        return super().__call__(_clamp_cotangent(z), max_value)


def guided_rules(rules: Rules) -> Rules:
    """``rules`` with every ReLU's gradient clamped to ``>= 0`` after its rule (Guided Backprop)."""
    return rules.replace(relu=as_rule(ClampedReLU, rules.relu))


def guided_backprop(
    model: Model, x, targets, *, rules: Rules | str = attribution.BASELINE_RULES, **overrides
) -> jax.Array:
    """Guided Backprop of each target logit (each ReLU's gradient under ``rules``, clamped to ``>= 0``):
    ``(N, K, H, W, 3)``. Under ``"vanilla"``: ``g * 1[z > 0] * 1[g > 0]`` at every ReLU."""
    x, t, r = attribution.prepare(model, x, targets, rules, overrides)
    return method.pullback_core(model, x, t, guided_rules(r))


# --------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------


def _tokens(name: str) -> tuple[str, ...]:
    """``"layer4[-1].conv3"``, ``"layer4/-1/conv3"``, ``"layer4_-1_conv3"`` -> ``("layer4", "-1", "conv3")``."""
    return tuple(t for t in re.split(r"[./_\[\]]", name) if t)


@functools.lru_cache(maxsize=64)
def _module_calls(spec: ModelSpec, shapes: tuple, height: int, width: int) -> dict[Path, int]:
    """How often each module's ``__call__`` runs in a forward pass (traced abstractly), by module path."""
    calls: dict[Path, int] = collections.Counter()

    def count(next_fun, args, kwargs, context):
        if context.method_name == "__call__":
            calls[tuple(context.module.path)] += 1
        return next_fun(*args, **kwargs)

    params = jax.tree.unflatten(shapes[0], [jax.ShapeDtypeStruct(s, d) for s, d in shapes[1]])
    with nn.intercept_methods(count):
        jax.eval_shape(
            lambda p, x: Model(p, spec).apply(x), params, jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
        )
    return dict(calls)


def _shown(path: Path) -> str:
    return ".".join(path)


def resolve_layer(model: Model, layer: None | str | GradCamLayer, image_hw: tuple[int, int]) -> tuple[Path, bool]:
    """The module path and ``before_batchnorm`` of ``layer`` (default: the family's declaration).

    Raises:
      ValueError: the architecture declares none and none is given, the name matches no module
        (or several), the module runs more than once, or ``before_batchnorm`` names a module
        without a folded bias.
    """
    if layer is None:
        layer = models.get(model.arch).gradcam_layer
        if layer is None:
            raise ValueError(
                f"{model.arch} declares no GradCAM layer: pass layer='...' (a module path, e.g. the last "
                "block of its feature maps)"
            )
    if isinstance(layer, str):
        layer = GradCamLayer(layer)
    if not isinstance(layer, GradCamLayer) or not isinstance(layer.path, str) or not layer.path.strip():
        raise ValueError(f"layer must be a module path (a string) or a GradCamLayer, got {layer!r}")
    if not isinstance(layer.before_batchnorm, (bool, np.bool_)):
        raise ValueError(f"GradCamLayer.before_batchnorm must be True or False, got {layer.before_batchnorm!r}")
    leaves, tree = jax.tree.flatten(model.params)
    shapes = (tree, tuple((tuple(a.shape), jnp.dtype(a.dtype)) for a in leaves))
    calls = _module_calls(model.spec, shapes, *image_hw)
    table: dict[tuple[str, ...], list] = {}
    for path in calls:
        if path:
            table.setdefault(_tokens("/".join(path)), []).append(path)
    examples = ", ".join(_shown(p) for p in list(calls)[-4:] if p)
    unknown = ValueError(
        f"unknown GradCAM layer {layer.path!r} for {model.arch}: name a module of its parameter tree, e.g. {examples}"
    )
    resolved = []
    for i, token in enumerate(_tokens(layer.path)):
        if re.fullmatch(r"-\d+", token):  # torchvision's layer4[-1]: the last numbered child
            numbered = sorted({int(k[i]) for k in table if k[:i] == tuple(resolved) and len(k) > i and k[i].isdigit()})
            if not numbered or -int(token) > len(numbered):
                raise unknown
            token = str(numbered[int(token)])
        resolved.append(token)
    found = table.get(tuple(resolved), [])
    if not found:
        raise unknown
    if len(found) > 1:
        raise ValueError(f"GradCAM layer {layer.path!r} is ambiguous in {model.arch}: it names {found}")
    path = found[0]
    if calls[path] != 1:
        raise ValueError(
            f"GradCAM layer {_shown(path)!r} runs {calls[path]} times in {model.arch}: name a module that runs once"
        )
    if layer.before_batchnorm:
        p = model.params
        for name in path:
            p = p.get(name, {}) if isinstance(p, dict) else {}
        if not (isinstance(p, dict) and "bias" in p and np.ndim(p.get("kernel")) == 4):
            raise ValueError(
                f"GradCAM layer {_shown(path)!r} of {model.arch} is not a convolution with a folded BatchNorm: "
                "drop before_batchnorm"
            )
    return path, bool(layer.before_batchnorm)


# --------------------------------------------------------------------------------------
# Pure cores
# --------------------------------------------------------------------------------------


def _apply_capturing(model: Model, x: jax.Array, rules: Rules, path: Path, before_batchnorm: bool, delta):
    """Logits of ``x`` with the output ``y`` of the module at ``path`` replaced by ``y + delta`` (when
    ``delta`` is given), and that output (minus the module's bias with ``before_batchnorm``)."""
    captured = []

    def intercept(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or tuple(context.module.path) != path:
            return next_fun(*args, **kwargs)
        y = next_fun(*args, **kwargs)
        captured.append(y - context.module.variables["params"]["bias"] if before_batchnorm else y)
        return y if delta is None else y + delta

    with nn.intercept_methods(intercept):
        logits = model.apply(x, rules)
    return logits, captured[0]


def nearest_indices(size_in: int, size_out: int) -> np.ndarray:
    """The source index of each output position of torch's ``F.interpolate(mode="nearest")``:
    ``min(floor(i * (in / out)), in - 1)`` in float32, as torch computes it."""
    scale = np.float32(size_in) / np.float32(size_out)
    return np.minimum(np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64), size_in - 1)


@functools.partial(jax.jit, static_argnames=("path", "before_batchnorm"))
def gradcam_core(
    model: Model, x: jax.Array, targets: jax.Array, rules: Rules, path: Path, before_batchnorm: bool
) -> jax.Array:
    """GradCAM ``relu(sum_c mean_hw(dlogit / dA_c) * A_c)`` of the module at ``path`` (gradients under
    ``rules``), upsampled to the image by nearest neighbour: ``(N, H, W, 3)``, ``(N, K)`` -> ``(N, K, H, W)``."""
    act = jax.eval_shape(lambda x: _apply_capturing(model, x, rules, path, before_batchnorm, None)[1], x)
    if len(act.shape) != 4:
        raise ValueError(
            f"GradCAM needs a layer with a spatial output (N, h, w, C); {'.'.join(path)} gives shape {act.shape}"
        )
    _, vjp, a = jax.vjp(
        lambda d: _apply_capturing(model, x, rules, path, before_batchnorm, d),
        jnp.zeros(act.shape, act.dtype),
        has_aux=True,
    )
    (grads,) = jax.vmap(vjp)(jax.nn.one_hot(targets.T, model.num_classes, dtype=jnp.float32))  # (K, N, h, w, C)
    weights = jnp.mean(grads, axis=(2, 3))  # (K, N, C)
    cam = jax.nn.relu(jnp.sum(weights[:, :, None, None, :] * a[None], axis=-1))  # (K, N, h, w)
    rows, cols = nearest_indices(a.shape[1], x.shape[1]), nearest_indices(a.shape[2], x.shape[2])
    return jnp.swapaxes(cam[:, :, rows][:, :, :, cols], 0, 1)


@functools.partial(jax.jit, static_argnames=("path", "before_batchnorm"))
def guided_gradcam_core(
    model: Model, x: jax.Array, targets: jax.Array, rules: Rules, path: Path, before_batchnorm: bool
) -> jax.Array:
    """Guided Backprop under ``rules`` times the upsampled GradCAM under ``rules``: ``(N, K, H, W, 3)``."""
    cam = gradcam_core(model, x, targets, rules, path, before_batchnorm)
    return method.pullback_core(model, x, targets, guided_rules(rules)) * cam[..., None]


# --------------------------------------------------------------------------------------
# Public explainers
# --------------------------------------------------------------------------------------


def gradcam(
    model: Model,
    x,
    targets,
    *,
    layer: None | str | GradCamLayer = None,
    rules: Rules | str = attribution.BASELINE_RULES,
    **overrides,
) -> jax.Array:
    """GradCAM of ``layer`` (default: the family's), upsampled as Captum's Guided GradCAM does:
    ``(N, K, H, W)``, one channel."""
    x, t, r = attribution.prepare(model, x, targets, rules, overrides)
    path, before = resolve_layer(model, layer, x.shape[1:3])
    return gradcam_core(model, x, t, r, path, before)


def guided_gradcam(
    model: Model,
    x,
    targets,
    *,
    layer: None | str | GradCamLayer = None,
    rules: Rules | str = attribution.BASELINE_RULES,
    **overrides,
) -> jax.Array:
    """Guided GradCAM (Captum's ``GuidedGradCam``, nearest upsampling) of ``layer`` (default: the
    family's declaration), gradients under ``rules``: ``(N, K, H, W, 3)``."""
    x, t, r = attribution.prepare(model, x, targets, rules, overrides)
    path, before = resolve_layer(model, layer, x.shape[1:3])
    return guided_gradcam_core(model, x, t, r, path, before)


__all__ = ["GradCamLayer", "ClampedReLU", "gradcam", "guided_gradcam", "guided_backprop", "resolve_layer"]
