"""The two protocols of ``jaxpull evaluate``: which metrics, with which settings, on which items.

* ``quick`` (the default): jaxpull's own quick protocol. Focus on 2x2 mosaics of 2x2-averaged
  images (:func:`jaxpull.evaluation.mosaics.make_mosaics`), faithfulness correlation over a 4x4
  grid of patches, infidelity with Gaussian perturbations, max-sensitivity, random-logit SSIM and
  cascading randomisation; every explainer is compared with the gradient.
* ``paper``: the paper's table (its ``lib/evaluator.py`` ``default_metrics`` and
  ``evaluate_focus.py``): Infidelity (its optimal-scaling variant over patches of 1/2 and 1/4 of
  the image), Faithfulness Correlation over patches of 1/4, Faithfulness Estimate and Monotonicity
  Correlation over groups of 1/16 of the pixels, Max-Sensitivity, Random Logit and Focus on the
  paper's mosaics, each equal to Quantus 0.6.0 (``tests/test_metrics_quantus.py``). At 224 pixels
  these are the paper's own numbers (112 + 56-pixel patches, 56-pixel patches, 3136 features per
  step, 112-pixel tiles); other sizes scale them. Every pullback explainer is compared with its
  baseline (``jaxpull.evaluation.explainers.PAPER_PAIRS``).

A metric scores one :class:`Batch`: one explainer's maps of a batch of images (or of mosaics,
for Focus), with a random key that depends on the metric and the batch only, so every explainer
is scored on the same perturbations and a resumed run draws what an uninterrupted one draws.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxpull.core import checks
from jaxpull.core.model import Model
from jaxpull.evaluation import explainers, faithfulness, metrics, mosaics

MapFunction = Callable[[Any, Any], Any]  # (x (n, H, W, 3), targets (n,)) -> maps (n, H, W, 3)


class Batch(NamedTuple):
    """What a metric scores: one explainer's ``maps`` ``(n, H, W, 3)`` of the items ``x``
    ``(n, H, W, 3)`` (images, or Focus mosaics with their target ``quadrants`` ``(n, 4)``) for
    ``labels`` ``(n,)``; ``explain`` the same explainer as a :data:`MapFunction`, ``explain_model``
    as ``(model, x, t) -> maps``; ``key`` and ``seed``: this metric's draws for this batch."""

    model: Model
    x: np.ndarray
    labels: np.ndarray
    maps: Any
    explain: MapFunction
    explain_model: Callable
    key: jax.Array
    seed: int
    quadrants: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class Metric:
    """A metric of a protocol: ``score(batch, **settings)`` -> ``(n,)`` scores (with ``curve``:
    ``(stage names, (stages, n))``, the last stage being the score); ``on``: ``"images"`` or
    ``"mosaics"``; ``title``: its column heading; ``description`` may name its ``{settings}``."""

    title: str
    higher_is_better: bool
    description: str
    score: Callable[..., Any]
    on: str = "images"
    curve: bool = False


# --------------------------------------------------------------------------------------
# Scoring functions
# --------------------------------------------------------------------------------------


def _focus(b: Batch, variant: str = "quantus", **_) -> np.ndarray:
    return np.asarray(metrics.focus(b.maps, b.x, b.quadrants, variant=variant))


def _faithfulness(b: Batch, grid: int, baseline: float) -> np.ndarray:
    return np.asarray(metrics.faithfulness_correlation(b.model, b.x, b.labels, b.maps, grid=grid, baseline=baseline))


def _infidelity(b: Batch, sigma: float, samples: int) -> np.ndarray:
    return np.asarray(metrics.infidelity(b.model, b.x, b.labels, b.maps, b.key, sigma=sigma, samples=samples))


def _max_sensitivity(b: Batch, radius: float, samples: int) -> np.ndarray:
    return np.asarray(metrics.max_sensitivity(b.explain, b.x, b.labels, b.maps, b.key, radius=radius, samples=samples))


def _random_logit(b: Batch) -> np.ndarray:
    return np.asarray(metrics.random_logit(b.explain, b.x, b.labels, b.maps, b.model.num_classes, b.seed))


def _randomization(b: Batch, stages: int) -> tuple[list[str], np.ndarray]:
    names, rho = metrics.model_randomization(b.explain_model, b.model, b.x, b.labels, b.maps, b.key, stages)
    return names, np.asarray(rho)


# The perturbed copies of one image go through the model in chunks of this many (memory only:
# the scores do not depend on it).
PERTURBATION_BATCH = 32


def _infidelity_paper(b: Batch, patch_sizes, samples: int, low: float, high: float) -> np.ndarray:
    return np.asarray(
        faithfulness.infidelity_paper(
            b.model, b.x, b.labels, b.maps, b.key, tuple(patch_sizes), samples, low, high, batch_size=PERTURBATION_BATCH
        )
    )


def _correlation_paper(b: Batch, patch_sizes, baseline: float, abs: bool) -> np.ndarray:
    return np.asarray(
        faithfulness.faithfulness_correlation_paper(
            b.model, b.x, b.labels, b.maps, tuple(patch_sizes), baseline, abs, batch_size=PERTURBATION_BATCH
        )
    )


def _estimate(b: Batch, features_in_step: int, baseline: float, abs: bool) -> np.ndarray:
    return np.asarray(
        faithfulness.faithfulness_estimate(
            b.model, b.x, b.labels, b.maps, features_in_step, baseline, abs, batch_size=PERTURBATION_BATCH
        )
    )


def _monotonicity(
    b: Batch, features_in_step: int, samples: int, low: float, high: float, abs: bool, eps: float
) -> np.ndarray:
    return np.asarray(
        faithfulness.monotonicity_correlation(
            b.model,
            b.x,
            b.labels,
            b.maps,
            b.key,
            features_in_step,
            samples,
            "uniform",
            low,
            high,
            abs=abs,
            eps=eps,
            batch_size=PERTURBATION_BATCH,
        )
    )


def _random_logit_paper(b: Batch, num_classes: int, seed: int) -> np.ndarray:
    # Quantus reseeds for every metric call, one call per loader batch: the batch is the call
    return np.asarray(
        metrics.random_logit_paper(
            b.model, b.explain, b.x, b.labels, b.maps, num_classes, seed, batch_size=max(1, len(b.x))
        )
    )


# --------------------------------------------------------------------------------------
# Settings: each protocol's, derived from the image size (and checked against it)
# --------------------------------------------------------------------------------------


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _mosaic_size(h: int, w: int, metric: str) -> None:
    _need(
        h == w and h % 2 == 0 and h >= 2,
        f"{metric}: Focus mosaics need square images of an even size (four equal tiles), the model takes "
        f"{h}x{w}: leave focus out (--metrics) or use a model with an even input size",
    )


def quick_settings(h: int, w: int, num_classes: int, stages: int = 6, sensitivity_samples: int = 10) -> dict[str, dict]:
    """The quick protocol's metric settings for ``h`` x ``w`` images."""
    return {
        "focus": {"variant": "quantus"},
        "faithfulness": {"grid": 4, "baseline": 0.0},
        "infidelity": {"sigma": 0.1, "samples": 32},
        "max_sensitivity": {"radius": 0.05, "samples": sensitivity_samples},
        "random_logit": {},
        "randomization": {"stages": stages},
    }


def _check_quick(name: str, s: dict, h: int, w: int, num_classes: int) -> None:
    if name == "focus":
        _need(h % 2 == 0 and w % 2 == 0, f"focus: mosaics of 2x2-averaged images need an even image size, got {h}x{w}")
    elif name == "faithfulness":
        g = s["grid"]
        _need(h % g == 0 and w % g == 0, f"faithfulness: a {h}x{w} image does not split into a {g}x{g} grid")


def paper_settings(h: int, w: int, num_classes: int, stages: int = 6, sensitivity_samples: int = 10) -> dict[str, dict]:
    """The paper's metric settings (``lib/evaluator.py``) scaled to ``h`` x ``w`` images: at 224
    pixels exactly the paper's (patches 112 + 56 and 56, 3136 features per step, 112-pixel tiles)."""
    s = min(h, w)
    step = max(1, h * w // 16)
    return {
        "infidelity": {"patch_sizes": [s // 2, s // 4], "samples": 5, "low": -1.0, "high": 1.0},
        "faithfulness_correlation": {"patch_sizes": [s // 4], "baseline": 0.0, "abs": True},
        "faithfulness_estimate": {"features_in_step": step, "baseline": 0.0, "abs": True},
        "monotonicity_correlation": {
            "features_in_step": step,
            "samples": 10,
            "low": -1.0,
            "high": 1.0,
            "abs": True,
            "eps": 1e-12,
        },
        "max_sensitivity": {"radius": 0.02, "samples": 10},
        "random_logit": {"num_classes": min(num_classes, 1000), "seed": 42},
        "focus": {"variant": "quantus", "tile": h // 2, "images": "repeated", "seed": mosaics.PAPER_SEED},
        "randomization": {"stages": stages},
    }


def _check_paper(name: str, s: dict, h: int, w: int, num_classes: int) -> None:
    if name == "infidelity":
        for p in s["patch_sizes"]:
            _need(
                p >= 1 and h % p == 0 and w % p == 0,
                f"infidelity: the paper's patches of 1/2 and 1/4 of the image ({s['patch_sizes']} pixels) must divide "
                f"the {h}x{w} image (Quantus fails otherwise): use a model whose input size is a multiple of 4",
            )
    elif name == "faithfulness_correlation":
        p = s["patch_sizes"][0]
        _need(p >= 1 and -(-h // p) * -(-w // p) >= 2, f"faithfulness_correlation: {h}x{w} images are too small")
    elif name in ("faithfulness_estimate", "monotonicity_correlation"):
        k = s["features_in_step"]
        _need(
            k >= 1 and (h * w) % k == 0,
            f"{name}: features_in_step={k} must divide H * W = {h * w}: use a model whose input size is a multiple of 4",
        )
    elif name == "focus":
        _mosaic_size(h, w, "focus")
        checks.choice(s["images"], FOCUS_IMAGES, "Focus target images")


FOCUS_IMAGES = ("repeated", "distinct")  # the paper's (one target image twice) / the original Focus paper's


class Protocol(NamedTuple):
    """A protocol: its metrics, their settings for an image size (``settings(h, w, num_classes,
    stages, sensitivity_samples)``) and their check (``check(name, settings, h, w, num_classes)``),
    and its defaults."""

    name: str
    description: str
    metrics: dict[str, Metric]
    default_metrics: tuple[str, ...]
    settings: Callable[..., dict[str, dict]]
    check: Callable[..., None]
    mosaics: int  # default number of Focus mosaics
    seed: int
    batch: int  # images per batch
    resamples: int  # bootstrap resamples


_RANDOMIZATION = Metric(
    "Randomisation",
    False,
    "cascading model randomisation: Spearman r of the saliency with the original's after re-drawing every "
    "layer top-down in {stages} steps",
    _randomization,
    curve=True,
)

QUICK = Protocol(
    "quick",
    "jaxpull's quick protocol",
    {
        "focus": Metric(
            "Focus",
            True,
            "Focus on 2x2 mosaics of 2x2-averaged images: share of positive relevance (x * attribution, each "
            "channel clipped at 0 as quantus.Focus) in the target's two quadrants; chance 0.5",
            _focus,
            on="mosaics",
        ),
        "faithfulness": Metric(
            "Faithfulness",
            True,
            "faithfulness correlation: Pearson r over a {grid}x{grid} grid of patches (set to {baseline}) of "
            "attribution sum vs target-logit drop",
            _faithfulness,
        ),
        "infidelity": Metric(
            "Infidelity",
            False,
            "infidelity with optimal scaling, Gaussian perturbations sigma {sigma} ({samples} per image)",
            _infidelity,
        ),
        "max_sensitivity": Metric(
            "Max-Sensitivity",
            False,
            "max-sensitivity: largest relative change of the map under uniform noise of radius {radius} "
            "({samples} draws)",
            _max_sensitivity,
        ),
        "random_logit": Metric(
            "Random Logit",
            False,
            "random-logit: SSIM of the saliency for the target and for a random other class",
            _random_logit,
        ),
        "randomization": _RANDOMIZATION,
    },
    ("focus", "faithfulness", "infidelity"),
    quick_settings,
    _check_quick,
    mosaics=50,
    seed=0,
    batch=8,
    resamples=2000,
)

PAPER = Protocol(
    "paper",
    "the paper's protocol (lib/evaluator.py and evaluate_focus.py of its code)",
    {
        "infidelity": Metric(
            "Infidelity",
            False,
            "the paper's Infidelity with optimal scaling: cumulative patch perturbations of {patch_sizes}-pixel "
            "patches, one uniform value in [{low}, {high}] per patch, {samples} samples",
            _infidelity_paper,
        ),
        "faithfulness_correlation": Metric(
            "Faithfulness Correlation",
            True,
            "the paper's Faithfulness Correlation: Pearson r over the {patch_sizes}-pixel patches (set to "
            "{baseline}) of |attribution| sum vs target-logit drop",
            _correlation_paper,
        ),
        "faithfulness_estimate": Metric(
            "Faithfulness Estimate",
            True,
            "quantus.FaithfulnessEstimate(features_in_step={features_in_step}, perturb_baseline={baseline}, abs={abs})",
            _estimate,
        ),
        "monotonicity_correlation": Metric(
            "Monotonicity Correlation",
            True,
            "quantus.MonotonicityCorrelation(nr_samples={samples}, features_in_step={features_in_step}, "
            "uniform baseline in [{low}, {high}], abs={abs}, eps={eps})",
            _monotonicity,
        ),
        "max_sensitivity": Metric(
            "Max-Sensitivity",
            False,
            "quantus.MaxSensitivity(nr_samples={samples}, lower_bound={radius})",
            _max_sensitivity,
        ),
        "random_logit": Metric(
            "Random Logit",
            False,
            "quantus.RandomLogit(num_classes={num_classes}, seed={seed}, similarity_func=correlation_pearson)",
            _random_logit_paper,
        ),
        "focus": Metric(
            "Focus",
            True,
            "quantus.Focus(abs=False, normalise=False) on x * attribution, on the paper's mosaics of four "
            "{tile}-pixel tiles (the target image {images} in two quadrants, numpy.random.default_rng({seed}))",
            _focus,
            on="mosaics",
        ),
        "randomization": _RANDOMIZATION,
    },
    (
        "infidelity",
        "faithfulness_correlation",
        "faithfulness_estimate",
        "monotonicity_correlation",
        "max_sensitivity",
        "random_logit",
        "focus",
    ),
    paper_settings,
    _check_paper,
    mosaics=100,
    seed=0,
    batch=10,
    resamples=10000,
)

PROTOCOLS: dict[str, Protocol] = {"quick": QUICK, "paper": PAPER}


def get(name: str) -> Protocol:
    """The protocol called ``name``; ValueError listing the choices."""
    checks.choice(name, tuple(PROTOCOLS), "protocol")
    return PROTOCOLS[name]


def metric_settings(
    protocol: Protocol,
    names: Sequence[str],
    h: int,
    w: int,
    num_classes: int,
    given: Mapping[str, Mapping[str, Any]] | None = None,
    **counts,
) -> dict[str, dict]:
    """Every metric's settings for ``h`` x ``w`` images (the protocol's, ``given`` replacing any of
    them), each chosen one in ``names`` checked against the image size: ValueError naming the metric."""
    for n in names:
        checks.choice(n, tuple(protocol.metrics), f"metric of the {protocol.name} protocol")
    settings = protocol.settings(h, w, num_classes, **counts)
    for metric, values in (given or {}).items():
        checks.choice(metric, tuple(protocol.metrics), f"metric of the {protocol.name} protocol")
        unknown = set(values) - set(settings[metric])
        if unknown:
            raise ValueError(
                f"{metric} has no setting {sorted(unknown)[0]!r}: its settings are {', '.join(settings[metric])}"
            )
        settings[metric] = {**settings[metric], **values}
    for n in names:
        for count in ("samples", "stages"):  # zero draws would score nothing
            if count in settings[n]:
                checks.whole(settings[n][count], f"{n} {count}", 1)
        protocol.check(n, settings[n], h, w, num_classes)
    return settings


# --------------------------------------------------------------------------------------
# Focus mosaics: a plan (which image where) first, pixels batch by batch
# --------------------------------------------------------------------------------------


def plan_mosaics(protocol: Protocol, classes: np.ndarray, count: int, seed: int, focus: dict) -> mosaics.MosaicPlan:
    """Which images make each of ``count`` mosaics, from the class of every image ``(N,)`` alone.

    Quick protocol: :func:`jaxpull.evaluation.mosaics.make_mosaics`'s draws (they do not depend on
    the pixels, so it runs on 2x2 stand-ins); paper: :func:`~jaxpull.evaluation.mosaics.plan_paper_mosaics`
    with the Focus settings' seed and ``images`` (``"distinct"``: two different target images).
    """
    classes = np.asarray(classes, np.int64)
    if protocol.name == "quick":
        m = mosaics.make_mosaics(np.zeros((len(classes), 2, 2, 3), np.float32), classes, count, seed)
        return mosaics.MosaicPlan(m.targets, m.quadrants, m.sources)
    return mosaics.plan_paper_mosaics(classes, count, focus["seed"], focus["images"] == "distinct")


def build_mosaics(protocol: Protocol, source, plan: mosaics.MosaicPlan, rows: slice, focus: dict) -> np.ndarray:
    """The pixels ``(m, H, W, 3)`` of the mosaics ``rows`` of ``plan``, reading only their source images."""
    part = mosaics.MosaicPlan(plan.targets[rows], plan.quadrants[rows], plan.sources[rows])
    if protocol.name == "paper":
        return np.asarray(mosaics.build_mosaics(source, part, focus["tile"]).images)
    needed = np.unique(part.sources)
    x = source.load(needed)
    n, h, w, _ = x.shape
    tiles = x.reshape(n, h // 2, 2, w // 2, 2, 3).mean(axis=(2, 4))[np.searchsorted(needed, part.sources)]
    top = np.concatenate([tiles[:, 0], tiles[:, 1]], axis=2)
    bottom = np.concatenate([tiles[:, 2], tiles[:, 3]], axis=2)
    return np.concatenate([top, bottom], axis=1)


def metric_key(seed: int, metric: str, batch: int) -> tuple[jax.Array, int]:
    """A metric's random key and integer seed for one batch: the same for every explainer."""
    tag = zlib.crc32(metric.encode())
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), tag), batch)
    return key, int(np.random.SeedSequence([seed, tag, batch]).generate_state(1)[0])


# --------------------------------------------------------------------------------------
# Explainers
# --------------------------------------------------------------------------------------

# The paper's explainers (its lib/evaluator.py; "Pullback-X" is X with the soft backward rules) are
# jaxpull.evaluation.explainers.PAPER_EXPLAINERS, in its table's order, and PAPER_PAIRS, each pullback
# form with the baseline it is compared with. The pullback forms run with the chosen rules (--rules
# and the rule settings); the baselines with their own (the plain gradient).
PULLBACKS = frozenset(explainers.PAPER_PAIRS) | {"PullbackAscentNoAlpha"}
# the quick protocol's defaults, and the explainer its differences are taken against
QUICK_EXPLAINERS = ("pullback", "pullback_ascent", "gradient", "gradient_ascent")
QUICK_BASELINE = "gradient"
# the explainers that take the number of noisy samples (--samples): SmoothGrad's copies, FusionGrad's
# copies per model, GradientShap's draws, and their pullback forms
SAMPLED = tuple(n for n, fn in explainers.EXPLAINERS.items() if "samples" in inspect.signature(fn).parameters)


class ExplainerSpec(NamedTuple):
    """One explainer of a run: ``name`` in :data:`jaxpull.evaluation.explainers.EXPLAINERS` (its
    row in the report), keyword ``options``."""

    name: str
    options: dict[str, Any]

    @property
    def label(self) -> str:
        """The explainer's row in the report: its registry name."""
        return self.name

    @property
    def key(self) -> str:
        """A file-name-safe identity of the explainer and its options (its results' folder)."""
        text = json.dumps([self.name, self.options], sort_keys=True, default=str)
        return f"{self.label}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"

    def map_function(self, model: Model) -> MapFunction:
        """``(x (n, H, W, 3), targets (n,)) -> (n, H, W, 3)``: one map per image for its target."""
        fn = explainers.get(self.name)

        def one_target(x, t):
            return fn(model, x, np.asarray(t)[:, None], **self.options)[:, 0]

        return one_target

    def model_function(self) -> Callable:
        """``(model, x, targets (n,)) -> (n, H, W, 3)``: the same with the model as an argument."""
        return lambda m, x, t: self.map_function(m)(x, t)


def explainer_names(protocol: Protocol, given: Sequence[str] | None) -> list[str]:
    """The explainers to run: ``given`` (``["all"]``: every one of the protocol) or the protocol's defaults."""
    if given is not None and list(given) != ["all"]:
        return list(given)
    if protocol.name == "paper":
        return list(explainers.PAPER_EXPLAINERS)
    return list(explainers.EXPLAINERS) if given is not None else list(QUICK_EXPLAINERS)


def explainer_specs(
    protocol: Protocol,
    names: Sequence[str],
    rules: str,
    rule_settings: Mapping[str, Any],
    ascent_settings: Mapping[str, Any],
    samples: int | None = None,
    gradcam_layer: str | None = None,
) -> list[ExplainerSpec]:
    """Each named explainer with its options: the pullback explainers get ``rules`` and the rule
    settings, every ascent the ascent settings, the noisy ones ``samples``, the GradCAM ones the
    ``layer``. ValueError for an unknown name or a name given twice."""
    if not names:
        raise ValueError("no explainers chosen: name at least one of " + ", ".join(explainers.EXPLAINERS))
    specs: list[ExplainerSpec] = []
    for name in names:
        explainers.get(name)  # ValueError listing the choices
        if name in explainers.PAPER_EXPLAINERS:  # a pullback form runs with the chosen rules, a baseline with its own
            options: dict[str, Any] = {"rules": rules, **rule_settings} if name in PULLBACKS else {}
        else:  # jaxpull's own names, as the quick protocol always ran them
            options = {"rules": rules} if name in explainers.TAKE_RULES else {}
            if "pullback" in name.lower():
                options.update(rule_settings)
        if "ascent" in name.lower():
            options.update(ascent_settings)
        if samples is not None and name in SAMPLED:
            options["samples"] = samples
        if gradcam_layer is not None and "cam" in name.lower():
            options["layer"] = gradcam_layer
        if any(s.name == name for s in specs):
            raise ValueError(f"explainer {name!r} is named twice: name each explainer once")
        specs.append(ExplainerSpec(name, options))
    if gradcam_layer is not None and not any("cam" in s.name.lower() for s in specs):
        raise ValueError("--gradcam-layer is given but no GradCAM explainer is chosen: add GuidedGradCam or drop it")
    return specs


def pairs(labels: Sequence[str]) -> list[tuple[str, str]]:
    """The (pullback, baseline) pairs of the paper's table whose two explainers are among ``labels``."""
    have = set(labels)
    return [(a, b) for a, b in explainers.PAPER_PAIRS.items() if a in have and b in have]
