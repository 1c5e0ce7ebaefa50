"""Explainers behind one signature and one registry, so that metrics can compare them on the same footing.

Every explainer is ``explainer(model, x, targets, **options) -> (N, K, H, W, 3)``: ``x`` images
``(N, H, W, 3)`` in [-1, 1], ``targets`` ``(K,)`` or ``(N, K)`` class indices, one attribution map per
(image, target), in input units, computed for all targets of an image together. ``get(name)`` returns
one; ``EXPLAINERS`` maps every name to its function.

The paper's explainers (its code's ``lib/evaluator.py``), by their names there (:data:`PAPER_EXPLAINERS`).
Every one takes ``rules=`` (a preset's name or a :class:`jaxpull.Rules`) and flat rule overrides
(``temperature=0.4``), so every X also runs under any rules; "Pullback-X" is X with the soft rules
switched on (their ``PullbackWrapper``). The baselines default to ``rules="vanilla"`` (the exact
gradient), the pullback forms to the paper's current rules, ``"semantic"`` (baseline / pullback form):

* ``Gradient`` / ``SoftPullback``: one gradient of the target logit, not normalised;
* ``GradientAscent`` / ``PullbackAscent``: x_K - x0 of 5 steps x <- x + 20 g / ||g||_2, no L2 ball,
  **no clamping at all**; ``GradientAscentClipLast`` / ``PullbackAscentClipLast``: the same, clamped
  to [-1, 1] after the last step only; ``PullbackAscentNoAlpha``: unclamped steps x <- x + g (no
  alpha, no normalisation);
* ``SmoothGrad`` / ``SmoothPullback``: the mean over 50 copies x + 0.15 N(0, 1);
* ``FusionGrad`` / ``FusionPullback``: SmoothGrad over 10 models whose parameters are multiplied by
  N(1, 0.1^2) noise, 10 copies each;
* ``GradientShap`` / ``PullbackShap``: Captum's GradientShap as Quantus calls it (zero baseline,
  5 samples, stdevs 0);
* ``IntegratedGradients`` / ``IntegratedPullbacks``: Captum's IG as Quantus calls it (zero
  baseline, 10 steps, riemann_trapezoid);
* ``DeepLift`` / ``PbDeepLift``: Captum's DeepLift (rescale rule), zero baseline;
* ``GuidedGradCam`` / ``GuidedPbCam``: Captum's GuidedGradCam; the layer is the model family's
  (``layer=`` overrides it).

(:mod:`.attribution`, :mod:`.deeplift` and :mod:`.cam` define them and say where jaxpull and Captum
differ; the zero baseline is mid-grey in [-1, 1].) The noise of the random ones is drawn from
``seed``, so a call is reproducible.

The names jaxpull had before (kept; some differ from the paper's namesakes):

=========================  ================================================================
``pullback``               excitation pullback (``rules="excitation"`` by default)
``pullback_ascent``        x_K - x0 of the preset's ascent along pullbacks (clamped every step)
``gradient``               the vanilla gradient (``Gradient``)
``gradient_ascent``        x_K - x0 of the preset's ascent along vanilla gradients (clamped every
                           step, eps 100: not the paper's ``GradientAscent``)
``gradient_x_input``       gradient * x (what the paper's ``DeepLift`` column computed: its
                           evaluation swaps every ReLU's class, and Captum's DeepLift then finds none)
``smoothgrad``             ``SmoothGrad``
``integrated_gradients``   ``IntegratedGradients`` (10 trapezoid steps, as Captum under Quantus)
``guided_backprop``        Guided Backprop's ReLU rule (Springenberg et al.)
``smoothgrad_pullback``    SmoothGrad of excitation pullbacks
=========================  ================================================================
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import jax

from jaxpull.core import checks, pullback as method, settings
from jaxpull.core.model import Model
from jaxpull.core.rules import Rules
from jaxpull.evaluation import attribution, cam
from jaxpull.evaluation.attribution import BASELINE_RULES, PULLBACK_RULES
from jaxpull.evaluation.deeplift import deeplift

Explainer = Callable[..., jax.Array]

CURRENT_RULES = PULLBACK_RULES  # the paper's current rules (the name this module used before)


def _pullback_form(baseline: Explainer, name: str, doc: str) -> Explainer:
    """``baseline`` with ``rules="semantic"`` by default (any ``rules=`` given still wins)."""

    def explainer(model: Model, x, targets, **options) -> jax.Array:
        return baseline(model, x, targets, **{"rules": PULLBACK_RULES, **options})

    explainer.__name__ = explainer.__qualname__ = name
    explainer.__doc__ = doc + f' ``{baseline.__name__}`` under the ``"semantic"`` rules: ``(N, K, H, W, 3)``.'
    signature = inspect.signature(baseline)  # the baseline's options, for help() and option checks
    params = [p.replace(default=PULLBACK_RULES) if p.name == "rules" else p for p in signature.parameters.values()]
    explainer.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    return explainer


# --------------------------------------------------------------------------------------
# The paper's ascents (lib/defaults.py's pga_kwargs_counterfactual and lib/evaluator.py's variants)
# --------------------------------------------------------------------------------------

# 5 steps, alpha 20, normalised steps, no L2 ball, margin 0, the target logit
PAPER_ASCENT = settings.Ascent(steps=5, alpha=20.0, eps=None)
_FIXED = {"clip": "its clamping", "alpha": "its step size", "normalize_step": "its step normalisation"}


def _ascent_explainer(name: str, default_rules: str, doc: str, **fixed) -> Explainer:
    """An explainer returning x_K - x0 of :data:`PAPER_ASCENT` with the settings ``fixed``."""
    ascent = PAPER_ASCENT.replace(**fixed)

    def explainer(model: Model, x, targets, *, rules=default_rules, **options) -> jax.Array:
        for key in fixed:
            if key in options:
                raise ValueError(f"{name} fixes {_FIXED[key]}: drop {key}, or use pullback_ascent (which takes it)")
        return method.ascent(model, x, targets, rules=rules, ascent=ascent, output="diff", **options)

    explainer.__name__ = explainer.__qualname__ = name
    explainer.__doc__ = doc + " ``rules`` and the other ascent settings (``steps``, ...) may be given."
    return explainer


pullback_ascent_no_clip = _ascent_explainer(
    "PullbackAscent",
    PULLBACK_RULES,
    "PullbackAscent: x_K - x0 of 5 pullback steps x <- x + 20 g / ||g||_2, no ball, never clamped (x_K may "
    "leave [-1, 1]): ``(N, K, H, W, 3)``.",
    clip="none",
)
pullback_ascent_clip_last = _ascent_explainer(
    "PullbackAscentClipLast",
    PULLBACK_RULES,
    "PullbackAscentClipLast: the unclamped ascent, x_K clamped to [-1 - margin, 1 + margin] after the "
    "last step only; x_K - x0, ``(N, K, H, W, 3)``.",
    clip="last",
)
pullback_ascent_no_alpha = _ascent_explainer(
    "PullbackAscentNoAlpha",
    PULLBACK_RULES,
    "PullbackAscentNoAlpha: x_K - x0 of 5 unnormalised pullback steps x <- x + g, never clamped: ``(N, K, H, W, 3)``.",
    clip="none",
    alpha=1.0,
    normalize_step=False,
)
paper_gradient_ascent = _ascent_explainer(
    "GradientAscent",
    BASELINE_RULES,
    "GradientAscent: x_K - x0 of 5 gradient steps x <- x + 20 g / ||g||_2, no ball, never clamped: "
    "``(N, K, H, W, 3)``.",
    clip="none",
)
gradient_ascent_clip_last = _ascent_explainer(
    "GradientAscentClipLast",
    BASELINE_RULES,
    "GradientAscentClipLast: the unclamped gradient ascent, clamped after the last step only: ``(N, K, H, W, 3)``.",
    clip="last",
)


# --------------------------------------------------------------------------------------
# The names jaxpull had before
# --------------------------------------------------------------------------------------


def pullback(model: Model, x, targets, **rules) -> jax.Array:
    """Excitation pullbacks (``jaxpull.pullback``; ``rules``: the preset and overrides): ``(N, K, H, W, 3)``."""
    return method.pullback(model, x, targets, **rules)


gradient = attribution.gradient


def pullback_ascent(model: Model, x, targets, **options) -> jax.Array:
    """x_K - x0 of the paper's PGA along pullbacks (``jaxpull.ascent``'s options): ``(N, K, H, W, 3)``."""
    return method.ascent(model, x, targets, output="diff", **options)


def gradient_ascent(model: Model, x, targets, *, rules: str = settings.DEFAULT_RULES, **options) -> jax.Array:
    """x_K - x0 of the same PGA along vanilla gradients, with the ascent settings of the preset ``rules``
    (``options``: ascent overrides): ``(N, K, H, W, 3)``."""
    return method.ascent(model, x, targets, rules="vanilla", ascent=rules, output="diff", **options)


def gradient_x_input(model: Model, x, targets, *, rules=BASELINE_RULES, **overrides) -> jax.Array:
    """Gradient (under ``rules``) times input: ``(N, K, H, W, 3)``."""
    x, t, r = attribution.prepare(model, x, targets, rules, overrides)
    return method.pullback_core(model, x, t, r) * x[:, None]


smoothgrad = attribution.smoothgrad
integrated_gradients = attribution.integrated_gradients
guided_backprop = cam.guided_backprop


def smoothgrad_pullback(model: Model, x, targets, *, rules=settings.DEFAULT_RULES, **options) -> jax.Array:
    """SmoothGrad of excitation pullbacks (``rules`` and overrides as ``jaxpull.pullback``): ``(N, K, H, W, 3)``."""
    return attribution.smoothgrad(model, x, targets, rules=rules, **options)


def soft_pullback(model: Model, x, targets, *, rules=PULLBACK_RULES, **overrides) -> jax.Array:
    """SoftPullback: one gated gradient of each target logit, not normalised: ``(N, K, H, W, 3)``."""
    return attribution.gradient(model, x, targets, rules=rules, **overrides)


smooth_pullback = _pullback_form(attribution.smoothgrad, "SmoothPullback", "SmoothPullback:")
fusion_pullback = _pullback_form(attribution.fusiongrad, "FusionPullback", "FusionPullback:")
pullback_shap = _pullback_form(attribution.gradient_shap, "PullbackShap", "PullbackShap:")
integrated_pullbacks = _pullback_form(attribution.integrated_gradients, "IntegratedPullbacks", "IntegratedPullbacks:")
pb_deeplift = _pullback_form(deeplift, "PbDeepLift", "PbDeepLift:")
guided_pb_cam = _pullback_form(cam.guided_gradcam, "GuidedPbCam", "GuidedPbCam:")


# --------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------

PAPER: dict[str, Explainer] = {
    "SoftPullback": soft_pullback,
    "PullbackAscent": pullback_ascent_no_clip,
    "PullbackAscentClipLast": pullback_ascent_clip_last,
    "GradientAscent": paper_gradient_ascent,
    "GradientAscentClipLast": gradient_ascent_clip_last,
    "PullbackAscentNoAlpha": pullback_ascent_no_alpha,
    "SmoothPullback": smooth_pullback,
    "FusionPullback": fusion_pullback,
    "SmoothGrad": attribution.smoothgrad,
    "FusionGrad": attribution.fusiongrad,
    "Gradient": attribution.gradient,
    "PullbackShap": pullback_shap,
    "GradientShap": attribution.gradient_shap,
    "IntegratedPullbacks": integrated_pullbacks,
    "IntegratedGradients": attribution.integrated_gradients,
    "PbDeepLift": pb_deeplift,
    "DeepLift": deeplift,
    "GuidedGradCam": cam.guided_gradcam,
    "GuidedPbCam": guided_pb_cam,
}
# The paper's explainers in its table's order (lib/evaluator.py's default_explainers, less its
# PullbackAscentBis / PullbackAscent3 step-count ablations).
PAPER_EXPLAINERS: tuple[str, ...] = tuple(PAPER)
# Each pullback form and the baseline it is compared with (the paper's paired differences).
PAPER_PAIRS: dict[str, str] = {
    "SoftPullback": "Gradient",
    "PullbackAscent": "GradientAscent",
    "PullbackAscentClipLast": "GradientAscentClipLast",
    "SmoothPullback": "SmoothGrad",
    "FusionPullback": "FusionGrad",
    "PullbackShap": "GradientShap",
    "IntegratedPullbacks": "IntegratedGradients",
    "PbDeepLift": "DeepLift",
    "GuidedPbCam": "GuidedGradCam",
}
# The explainers that read a layer (``layer=``; the family's default where it declares one).
NEED_LAYER: tuple[str, ...] = ("GuidedGradCam", "GuidedPbCam")

EXPLAINERS: dict[str, Explainer] = {
    "pullback": pullback,
    "pullback_ascent": pullback_ascent,
    "gradient": gradient,
    "gradient_ascent": gradient_ascent,
    "gradient_x_input": gradient_x_input,
    "smoothgrad": smoothgrad,
    "integrated_gradients": integrated_gradients,
    "guided_backprop": guided_backprop,
    "smoothgrad_pullback": smoothgrad_pullback,
    **PAPER,
}


# the explainers that follow a ``rules`` preset chosen by the caller (the CLI's --rules); the
# paper's explainers take ``rules`` too, but default to their own ("vanilla" or "semantic")
TAKE_RULES = ("pullback", "pullback_ascent", "gradient_ascent", "smoothgrad_pullback")


def get(name: str) -> Explainer:
    """The explainer called ``name``; ValueError listing the choices if there is none."""
    if not isinstance(name, str):
        raise ValueError(f"unknown explainer {name!r}: use one of {', '.join(EXPLAINERS)}")
    checks.choice(name, tuple(EXPLAINERS), "explainer")
    return EXPLAINERS[name]


__all__ = ["EXPLAINERS", "PAPER_EXPLAINERS", "PAPER_PAIRS", "NEED_LAYER", "get", "Rules"]
