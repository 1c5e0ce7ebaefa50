"""``evaluate``: every chosen explainer scored by every chosen metric on the same images, with
paired bootstrap confidence intervals against the vanilla gradient; markdown and CSV reports.

Labels are the model's own top-1 unless given. Focus mosaics are built from the same images,
their classes being the given classes (an ImageNet-style folder) or the top-1 labels. Every
random choice comes from ``seed``, which the report records, so a rerun reproduces it.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
from pathlib import Path
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxpull.core import checks
from jaxpull.evaluation import explainers, metrics
from jaxpull.core.model import Model


class Scoring(NamedTuple):
    """What a metric scores: one explainer's maps on the evaluation images, and the run's settings."""

    model: Model
    x: np.ndarray  # (N, H, W, 3) in [-1, 1]
    labels: np.ndarray  # (N,) targets
    maps: np.ndarray  # (N, H, W, 3): the explainer's map of each image for its label
    explain: Callable  # (model, x (n, H, W, 3), labels (n,)) -> maps (n, H, W, 3)
    key: jax.Array  # this metric's random key
    mosaics: Optional[metrics.Mosaics]  # Focus mosaics, when focus is scored
    batch: int  # images per explainer call
    sensitivity_samples: int
    stages: int
    seed: int


def _batched(s: Scoring, score: Callable[[slice], jax.Array], n: Optional[int] = None) -> np.ndarray:
    """``score(items)`` over slices of ``batch`` items, concatenated: ``(n,)``."""
    return np.concatenate([np.asarray(score(items)) for items in _chunks(len(s.x) if n is None else n, s.batch)])


def _focus(s: Scoring) -> np.ndarray:
    m = s.mosaics
    return _batched(
        s,
        lambda i: metrics.focus(
            s.explain(s.model, m.images[i], m.targets[i]), jnp.asarray(m.images[i]), jnp.asarray(m.quadrants[i])
        ),
        len(m.images),
    )


def _faithfulness(s: Scoring) -> np.ndarray:
    return np.asarray(metrics.faithfulness_correlation(s.model, s.x, jnp.asarray(s.labels), s.maps))


def _infidelity(s: Scoring) -> np.ndarray:
    return np.asarray(metrics.infidelity(s.model, s.x, jnp.asarray(s.labels), s.maps, s.key))


def _max_sensitivity(s: Scoring) -> np.ndarray:
    return _batched(
        s,
        lambda i: metrics.max_sensitivity(
            lambda xx, tt: s.explain(s.model, xx, tt),
            s.x[i],
            jnp.asarray(s.labels[i]),
            s.maps[i],
            jax.random.fold_in(s.key, i.start),
            samples=s.sensitivity_samples,
        ),
    )


def _random_logit(s: Scoring) -> np.ndarray:
    return np.asarray(
        metrics.random_logit(
            lambda xx, tt: s.explain(s.model, xx, tt), s.x, jnp.asarray(s.labels), s.maps, s.model.num_classes, s.seed
        )
    )


def _randomization(s: Scoring) -> Tuple[List[str], np.ndarray]:
    parts = [
        metrics.model_randomization(s.explain, s.model, s.x[i], s.labels[i], s.maps[i], s.key, s.stages)
        for i in _chunks(len(s.x), s.batch)
    ]
    return parts[0][0], np.concatenate([np.asarray(p[1]) for p in parts], axis=1)


class Metric(NamedTuple):
    """A metric of the registry: ``score(Scoring) -> (items,)``, or with ``curve`` a randomisation
    curve ``(stage names, (stages, N))`` whose last stage is the score."""

    score: Callable[[Scoring], object]
    higher_is_better: bool
    description: str  # ``{draws}``: the max-sensitivity samples
    curve: bool = False


METRICS: Dict[str, Metric] = {
    "focus": Metric(
        _focus,
        True,
        "Focus on 2x2 mosaics: share of positive relevance (x * attribution) in the target's two quadrants; chance 0.5",
    ),
    "faithfulness": Metric(
        _faithfulness,
        True,
        "faithfulness correlation: Pearson r over a 4x4 grid of patches (set to "
        "0) of attribution sum vs target-logit drop",
    ),
    "infidelity": Metric(
        _infidelity, False, "infidelity with optimal scaling, Gaussian perturbations sigma 0.1 (32 per image)"
    ),
    "max_sensitivity": Metric(
        _max_sensitivity,
        False,
        "max-sensitivity: largest relative change of the map under uniform noise of radius 0.05 ({draws} draws)",
    ),
    "random_logit": Metric(
        _random_logit, False, "random-logit: SSIM of the saliency for the target and for a random other class"
    ),
    "randomization": Metric(
        _randomization,
        False,
        "cascading model randomisation: Spearman r of saliency with the original after randomising all layers top-down",
        curve=True,
    ),
}
BASELINE = "gradient"
DEFAULT_EXPLAINERS = ("pullback", "pullback_ascent", "gradient", "gradient_ascent")
DEFAULT_METRICS = ("focus", "faithfulness", "infidelity")


@dataclasses.dataclass
class Report:
    """Per-item scores: ``scores[metric][explainer]`` ``(items,)``; randomisation curves
    ``curves[explainer]`` ``(stages, N)`` with ``stage_names``; the settings that made them."""

    scores: Dict[str, Dict[str, np.ndarray]]
    curves: Dict[str, np.ndarray]
    stage_names: List[str]
    settings: Dict[str, object]


def _chunks(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def top1(model: Model, x: np.ndarray, batch: int = 16) -> np.ndarray:
    """The model's top-1 label of every image ``(N, H, W, 3)`` -> ``(N,)``."""
    return np.concatenate([np.asarray(jnp.argmax(model(x[s]), -1)) for s in _chunks(len(x), batch)])


def bootstrap_ci(values: np.ndarray, resamples: int, rng: np.random.Generator) -> Tuple[float, float, float]:
    """Mean and percentile-bootstrap 95% interval of ``values`` (NaNs dropped)."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    means = v[rng.integers(0, v.size, (resamples, v.size))].mean(axis=1)
    return float(v.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired_difference(
    a: np.ndarray, b: np.ndarray, resamples: int, rng: np.random.Generator
) -> Tuple[float, float, float, int]:
    """Mean of ``a - b`` over items where both are finite, its paired-bootstrap 95% interval, and the count."""
    keep = np.isfinite(a) & np.isfinite(b)
    mean, lo, hi = bootstrap_ci(a[keep] - b[keep], resamples, rng)
    return mean, lo, hi, int(keep.sum())


def _map_function(name: str, options: Mapping[str, object]):
    explain = explainers.get(name)

    def one_target(m: Model, x, t):
        return explain(m, x, jnp.asarray(t)[:, None], **options)[:, 0]

    return one_target


def check_request(model: Model, names: Sequence[str], metric_names: Sequence[str], n_images: int) -> None:
    """Raise ValueError for unknown explainers or metrics before any compute starts."""
    if not names:
        raise ValueError("no explainers chosen: name at least one of " + ", ".join(explainers.EXPLAINERS))
    if not metric_names:
        raise ValueError("no metrics chosen: name at least one of " + ", ".join(METRICS))
    for n in names:
        explainers.get(n)
    for m in metric_names:
        checks.choice(m, METRICS, "metric")
    if n_images < 1:
        raise ValueError("no images to evaluate")
    if model.num_classes < 2:
        raise ValueError("the model needs at least 2 classes")


def check_counts(**counts: Optional[int]) -> None:
    """Every count given (``limit=..., mosaics=...``) is a positive integer or None; ValueError
    naming the CLI flag otherwise."""
    for flag, value in counts.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")


def check_focus_classes(classes: Sequence[int]) -> None:
    """Focus mosaics put 4 images of different classes together: at least 3 distinct classes."""
    distinct = len(set(int(c) for c in classes))
    if distinct < 3:
        raise ValueError(f"Focus mosaics need images of at least 3 distinct classes, these have {distinct}: add images")


def evaluate(
    model: Model,
    x: np.ndarray,
    labels: Optional[Sequence[int]] = None,
    classes: Optional[Sequence[int]] = None,
    *,
    explainer_names: Sequence[str] = DEFAULT_EXPLAINERS,
    metric_names: Sequence[str] = DEFAULT_METRICS,
    options: Optional[Mapping[str, Mapping[str, object]]] = None,
    mosaics: int = 50,
    stages: int = 6,
    sensitivity_samples: int = 10,
    seed: int = 0,
    batch: int = 8,
    progress: bool = True,
) -> Report:
    """Score explainers with metrics on images ``x`` ``(N, H, W, 3)`` in [-1, 1].

    Args:
      labels: the target of each image ``(N,)``; default the model's top-1.
      classes: each image's class for building Focus mosaics ``(N,)``; default ``labels``.
      explainer_names, metric_names: names from ``explainers.EXPLAINERS`` and ``METRICS``.
      options: per-explainer keyword options, e.g. ``{"pullback": {"temperature": 0.6}}``.
      mosaics: number of Focus mosaics; stages: cascading-randomisation steps;
        sensitivity_samples: perturbations per image for max-sensitivity.
      seed: every random draw (mosaics, noise, random labels, re-drawn weights) derives from it.
      batch: images explained per call.
    Returns:
      a :class:`Report`.
    """
    from tqdm.auto import tqdm

    x = np.asarray(checks.images(x))
    check_request(model, explainer_names, metric_names, len(x))
    options = dict(options or {})
    unknown = set(options) - set(explainer_names)
    if unknown:
        raise ValueError(f"options given for explainers not chosen: {', '.join(sorted(unknown))}")
    if labels is not None and np.shape(labels) != (len(x),):
        raise ValueError(f"need one label per image: {len(x)} images, labels of shape {np.shape(labels)}")
    labels = (
        top1(model, x)
        if labels is None
        else np.asarray(checks.per_image_labels(labels, len(x), model.num_classes, "labels"))
    )
    classes = labels if classes is None else np.asarray(classes)
    mosaic_set = metrics.make_mosaics(x, classes, mosaics, seed) if "focus" in metric_names else None
    key = jax.random.key(seed)

    scores: Dict[str, Dict[str, np.ndarray]] = {m: {} for m in metric_names}
    curves: Dict[str, np.ndarray] = {}
    stage_names: List[str] = []
    work = len(explainer_names) * len(metric_names)
    bar = tqdm(total=work, desc="evaluate", unit="score", disable=not progress)
    for name in explainer_names:
        fn = _map_function(name, options.get(name, {}))
        maps = np.concatenate([np.asarray(fn(model, x[s], labels[s])) for s in _chunks(len(x), batch)])
        for metric in metric_names:
            bar.set_postfix_str(f"{name} / {metric}")
            k = jax.random.fold_in(key, list(METRICS).index(metric))
            scoring = Scoring(model, x, labels, maps, fn, k, mosaic_set, batch, sensitivity_samples, stages, seed)
            if METRICS[metric].curve:
                stage_names, curves[name] = METRICS[metric].score(scoring)
                result = curves[name][-1]
            else:
                result = METRICS[metric].score(scoring)
            scores[metric][name] = result
            bar.update(1)
    bar.close()
    settings = dict(
        seed=seed,
        images=len(x),
        mosaics=mosaics if mosaic_set is not None else 0,
        stages=stages,
        sensitivity_samples=sensitivity_samples,
        explainers=list(explainer_names),
        metrics=list(metric_names),
        options={k: dict(v) for k, v in options.items()},
        arch=model.arch,
    )
    return Report(scores, curves, stage_names, settings)


def summary_rows(report: Report, resamples: int = 2000) -> List[Dict[str, object]]:
    """One row per (metric, explainer): mean and 95% CI, and the paired difference to the gradient."""
    rng = np.random.default_rng(int(report.settings["seed"]))
    rows = []
    for metric, per in report.scores.items():
        base = per.get(BASELINE)
        for name, values in per.items():
            mean, lo, hi = bootstrap_ci(values, resamples, rng)
            row = dict(
                metric=metric,
                explainer=name,
                n=int(np.isfinite(values).sum()),
                mean=mean,
                ci_low=lo,
                ci_high=hi,
                diff=float("nan"),
                diff_low=float("nan"),
                diff_high=float("nan"),
            )
            if base is not None and name != BASELINE:
                row["diff"], row["diff_low"], row["diff_high"], _ = paired_difference(values, base, resamples, rng)
            rows.append(row)
    return rows


def to_csv(rows: Sequence[Mapping[str, object]]) -> str:
    """The summary rows as CSV text."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return out.getvalue()


def _verdict(diff: float, lo: float, hi: float, higher: bool) -> str:
    if not np.isfinite(diff):
        return ""
    if lo > 0 or hi < 0:
        better = (lo > 0) == higher
        return "better" if better else "worse"
    return "no clear difference"


def to_markdown(report: Report, rows: Sequence[Mapping[str, object]], command: str = "") -> str:
    """A markdown report: settings, one table per metric, the randomisation curves."""
    s = report.settings
    lines = [f"# Evaluation of explainers on {s['arch']}", ""]
    if command:
        lines += ["Regenerate with:", "", "```", command, "```", ""]
    lines += [
        f"{s['images']} images, seed {s['seed']}, {s['mosaics']} Focus mosaics, {s['stages']} randomisation steps; "
        f"95% intervals are percentile bootstraps over items; differences to `{BASELINE}` are paired "
        "(the same items resampled for both).",
        "",
    ]
    if s["options"]:
        lines += ["Explainer options: " + "; ".join(f"`{k}`: {v}" for k, v in s["options"].items()), ""]
    for metric in report.scores:
        higher = METRICS[metric].higher_is_better
        lines += [
            f"## {metric} ({'higher' if higher else 'lower'} is better)",
            "",
            METRICS[metric].description.format(draws=s["sensitivity_samples"]),
            "",
            f"| explainer | n | mean [95% CI] | minus {BASELINE} [95% CI] | vs {BASELINE} |",
            "|---|---|---|---|---|",
        ]
        for r in rows:
            if r["metric"] != metric:
                continue
            diff = (
                "" if not np.isfinite(r["diff"]) else f"{r['diff']:+.4g} [{r['diff_low']:+.4g}, {r['diff_high']:+.4g}]"
            )
            verdict = _verdict(r["diff"], r["diff_low"], r["diff_high"], higher)
            lines.append(
                f"| {r['explainer']} | {r['n']} | {r['mean']:.4g} [{r['ci_low']:.4g}, {r['ci_high']:.4g}] | {diff} | {verdict} |"
            )
        lines.append("")
    if report.curves:
        lines += [
            "## Cascading randomisation, mean Spearman r per step (top-down)",
            "",
            "| explainer | " + " | ".join(f"to {n}" for n in report.stage_names) + " |",
            "|---|" + "---|" * len(report.stage_names),
        ]
        for name, curve in report.curves.items():
            lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in np.nanmean(curve, axis=1)) + " |")
        lines += [
            "",
            "Sanity verdict: an explainer passes when its mean correlation after randomising every "
            "layer is below 0.5 (the map depends on what the model learned).",
            "",
        ]
        for name, curve in report.curves.items():
            final = float(np.nanmean(curve[-1]))
            lines.append(f"- {name}: {final:.3f} -> {'passes' if final < 0.5 else 'FAILS'}")
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Image sets
# --------------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".JPEG")


def find_images(
    sources: Sequence[Union[str, os.PathLike]], limit: Optional[int] = None
) -> Tuple[List[Path], Optional[List[int]]]:
    """Image files from files and folders; an ImageNet-style folder (class subfolders) also gives classes.

    A single folder whose subfolders hold images is read as ``ImageFolder`` does: the class index
    is the subfolder's position in sorted order (so ImageNet's val folders of wnids map to the
    standard indices). Returns (paths, classes or None); ``limit`` keeps the first images of each class
    in turn. Raises ValueError for missing paths or when no images are found.
    """
    paths: List[Path] = []
    classes: Optional[List[int]] = None
    for src in sources:
        p = Path(src)
        if not p.exists():
            raise ValueError(f"image path {str(p)!r} does not exist")
    if len(sources) == 1 and Path(sources[0]).is_dir():
        root = Path(sources[0])
        subdirs = sorted(d for d in root.iterdir() if d.is_dir())
        if subdirs:
            per_class = [sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) for d in subdirs]
            classes = []
            rank = 0
            while any(rank < len(f) for f in per_class):
                for i, files in enumerate(per_class):
                    if rank < len(files):
                        paths.append(files[rank])
                        classes.append(i)
                rank += 1
    if classes is None:
        for src in sources:
            p = Path(src)
            paths.extend(sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) if p.is_dir() else [p])
    if limit is not None:
        paths = paths[:limit]
        classes = None if classes is None else classes[:limit]
    if not paths:
        raise ValueError(f"no images found in {', '.join(map(str, sources))}")
    return paths, classes
