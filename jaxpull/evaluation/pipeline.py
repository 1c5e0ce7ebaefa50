"""``evaluate``: every chosen explainer scored by every chosen metric on the same images.

:func:`evaluate` takes images in memory (the Python API); :func:`run_evaluation` takes any image
source (``jaxpull evaluate`` streams files through it) and a work directory to resume from.
Both check everything before any compute, then run the units of :mod:`jaxpull.evaluation.runner`
and return a :class:`~jaxpull.evaluation.report.Report` for :mod:`jaxpull.evaluation.report` to
render. The protocols (``"quick"``, the default, and ``"paper"``) are in
:mod:`jaxpull.evaluation.protocol`.

Labels are the model's own top-1 unless given; Focus mosaics are made of the same images, their
classes being the labels the run scores. Every random choice derives from ``seed``, which the
report records, so a rerun reproduces it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxpull.core import checks
from jaxpull.core.model import Model
from jaxpull.evaluation import explainers, protocol as protocols, runner
from jaxpull.evaluation.imagesource import ArraySource, find_images  # noqa: F401 (re-exported)
from jaxpull.evaluation.protocol import ExplainerSpec
from jaxpull.evaluation.report import (  # noqa: F401 (re-exported: their home before report.py)
    Report,
    bootstrap_ci,
    paired_difference,
    summary_rows,
    to_csv,
    to_markdown,
)

METRICS = protocols.QUICK.metrics
BASELINE = protocols.QUICK_BASELINE
DEFAULT_EXPLAINERS = protocols.QUICK_EXPLAINERS
DEFAULT_METRICS = protocols.QUICK.default_metrics


def top1(model: Model, x: np.ndarray, batch: int = 16) -> np.ndarray:
    """The model's top-1 label of every image ``(N, H, W, 3)`` -> ``(N,)``."""
    return runner.top1(model, ArraySource(np.asarray(x)), batch)


def check_counts(**counts: int | None) -> None:
    """Every count given (``limit=..., mosaics=...``) is a positive integer or None; ValueError
    naming the CLI flag otherwise."""
    for flag, value in counts.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
            raise ValueError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")


def run_evaluation(
    model: Model,
    source,
    labels: np.ndarray | None,
    specs: Sequence[ExplainerSpec],
    *,
    protocol: str = "quick",
    metric_names: Sequence[str] | None = None,
    mosaics: int | None = None,
    stages: int = 6,
    sensitivity_samples: int = 10,
    metric_settings: Mapping[str, Mapping[str, Any]] | None = None,
    focus_images: str = "repeated",
    seed: int | None = None,
    batch: int | None = None,
    drop_unavailable: bool = False,
    work: Path | None = None,
    progress: bool = True,
    extra_settings: Mapping[str, Any] | None = None,
    group=None,
    log=None,
) -> Report:
    """Score the explainers ``specs`` by ``metric_names`` on the images of ``source`` (an
    :class:`~jaxpull.evaluation.imagesource.ImageSource` or ``ArraySource``) for ``labels`` ``(N,)``
    (None: the model's top-1, computed once every setting is checked).

    Args:
      protocol: ``"quick"`` or ``"paper"``; metric_names: the protocol's (default: its defaults).
      mosaics: Focus mosaics (default: the protocol's); stages, sensitivity_samples: the quick
        protocol's randomisation steps and max-sensitivity draws.
      metric_settings: per metric, settings replacing the protocol's (e.g. ``{"infidelity":
        {"patch_sizes": [16, 8]}}``: for small test images).
      focus_images: the paper's mosaics hold one target image twice (``"repeated"``) or two
        different ones (``"distinct"``, the original Focus paper).
      seed, batch: every draw's seed and the images per unit (default: the protocol's).
      drop_unavailable: leave out (and name in the report) an explainer that cannot run on this
        model, e.g. GradCAM without a layer, instead of raising ValueError.
      work: a work directory to write every unit to and to resume from (see :mod:`.runner`).
      group, log: several processes on ``jax.distributed`` (:func:`.runner.run`): join the runtime
        with ``jaxpull.shell.distributed.initialize(Settings(...))``, then run the same call in
        every process with ``group=jaxpull.shell.distributed.current()`` and one ``work``
        directory they all see; each computes its share of the units and all return the same
        report. ``log`` (e.g. ``print``) gets a line on each process's share.
    Raises:
      ValueError: for any bad setting, before any compute.
    """
    proto = protocols.get(protocol)
    metric_names = list(proto.default_metrics if metric_names is None else metric_names)
    if not metric_names:
        raise ValueError("no metrics chosen: name at least one of " + ", ".join(proto.metrics))
    if len(set(metric_names)) != len(metric_names):
        raise ValueError("a metric is named twice: name each metric once")
    if not specs:
        raise ValueError("no explainers chosen: name at least one of " + ", ".join(explainers.EXPLAINERS))
    check_counts(mosaics=mosaics, stages=stages, sensitivity_samples=sensitivity_samples, batch_size=batch)
    runner.processes(group, work)  # several processes need their group and a shared work directory
    seed = proto.seed if seed is None else checks.seed(checks.whole(seed, "seed"))
    batch = proto.batch if batch is None else batch
    mosaics = proto.mosaics if mosaics is None else mosaics
    checks.choice(focus_images, protocols.FOCUS_IMAGES, "Focus target images")
    if len(source) < 1:
        raise ValueError("no images to evaluate")
    if model.num_classes < 2:
        raise ValueError("the model needs at least 2 classes")
    if labels is not None:
        labels = np.asarray(checks.per_image_labels(np.asarray(labels), len(source), model.num_classes, "labels"))
    h, w, _ = source.shape
    given = {k: dict(v) for k, v in (metric_settings or {}).items()}
    if proto.name == "paper" and focus_images != "repeated":
        given["focus"] = {**given.get("focus", {}), "images": focus_images}
    settings = protocols.metric_settings(
        proto, metric_names, h, w, model.num_classes, given, stages=stages, sensitivity_samples=sensitivity_samples
    )
    kept, dropped = runner.check_explainers(model, specs, (min(batch, len(source)), h, w, 3), drop_unavailable)
    if not kept:
        raise ValueError("no explainer can run on this model: " + "; ".join(f"{k}: {v}" for k, v in dropped.items()))
    if "randomization" in metric_names:
        runner.check_randomization(model, (h, w))
    described = "given" if labels is not None else "the model's top-1"
    if labels is None:  # the model's top-1, once every setting is checked
        labels = runner.top1(model, source, batch, progress)
    plan = None
    if any(proto.metrics[m].on == "mosaics" for m in metric_names):
        plan = protocols.plan_mosaics(proto, labels, mosaics, seed, settings.get("focus", {}))
    job = runner.Job(proto, model, source, labels, list(kept), metric_names, settings, plan, seed, batch, mosaics)
    results = runner.run(job, work, progress, group, log)
    report_settings = dict(
        protocol=proto.name,
        seed=seed,
        batch=batch,
        images=len(source),
        mosaics=0 if plan is None else len(plan.targets),
        stages=settings["randomization"]["stages"],
        sensitivity_samples=sensitivity_samples,
        explainers=[s.label for s in kept],
        dropped=dropped,
        metrics=list(metric_names),
        metric_settings={m: settings[m] for m in metric_names},
        options={s.label: dict(s.options) for s in kept if s.options},
        arch=model.arch,
        labels_used=[int(v) for v in labels],
        mosaic_targets=[] if plan is None else [int(v) for v in plan.targets],
        labels=described,
        rules="",
    )
    report_settings.update(extra_settings or {})
    return Report(results.scores, results.curves, results.stage_names, report_settings)


def evaluate(
    model: Model,
    x: np.ndarray,
    labels: Sequence[int] | None = None,
    *,
    protocol: str = "quick",
    explainer_names: Sequence[str] | None = None,
    metric_names: Sequence[str] | None = None,
    options: Mapping[str, Mapping[str, object]] | None = None,
    mosaics: int | None = None,
    stages: int = 6,
    sensitivity_samples: int = 10,
    metric_settings: Mapping[str, Mapping[str, Any]] | None = None,
    focus_images: str = "repeated",
    seed: int | None = None,
    batch: int | None = None,
    work: Path | None = None,
    progress: bool = True,
    group=None,
) -> Report:
    """Score explainers with metrics on images ``x`` ``(N, H, W, 3)`` in [-1, 1].

    Args:
      labels: the target of each image ``(N,)``; default the model's top-1. Focus mosaics are
        made of the images by these labels.
      protocol: ``"quick"`` (default) or ``"paper"`` (:mod:`jaxpull.evaluation.protocol`).
      explainer_names, metric_names: names from ``explainers.EXPLAINERS`` and the protocol's
        metrics (default: the protocol's).
      options: per-explainer keyword options, e.g. ``{"pullback": {"temperature": 0.6}}``.
      The rest: as :func:`run_evaluation`.
    Returns:
      a :class:`~jaxpull.evaluation.report.Report`.
    """
    x = np.asarray(checks.images(x))
    proto = protocols.get(protocol)
    names = protocols.explainer_names(proto, explainer_names)
    options = dict(options or {})
    unknown = set(options) - set(names)
    if unknown:
        raise ValueError(f"options given for explainers not chosen: {', '.join(sorted(unknown))}")
    if labels is not None and np.shape(labels) != (len(x),):
        raise ValueError(f"need one label per image: {len(x)} images, labels of shape {np.shape(labels)}")
    labels = None if labels is None else np.asarray(labels)
    for n in names:
        explainers.get(n)  # ValueError listing the choices
    specs = [ExplainerSpec(n, dict(options.get(n, {}))) for n in names]
    return run_evaluation(
        model,
        ArraySource(x),
        labels,
        specs,
        protocol=protocol,
        metric_names=metric_names,
        mosaics=mosaics,
        stages=stages,
        sensitivity_samples=sensitivity_samples,
        metric_settings=metric_settings,
        focus_images=focus_images,
        seed=seed,
        batch=batch,
        work=work,
        progress=progress,
        group=group,
    )


def render(report: Report, command: str = "", resamples: int | None = None) -> dict[str, str]:
    """The report's markdown and CSV texts in its protocol's layout: ``{"md": ..., "csv": ...}``."""
    from jaxpull.evaluation import report as reports

    s = report.settings
    proto = protocols.get(str(s.get("protocol", "quick")))
    resamples = proto.resamples if resamples is None else resamples
    if proto.name == "quick":
        rows = summary_rows(report, resamples)
        return {"md": to_markdown(report, rows, command), "csv": to_csv(rows)}
    s["resamples"] = resamples
    pairs = protocols.pairs(list(report.scores[next(iter(report.scores))]))
    rows = reports.paper_rows(report, pairs, resamples)
    return {"md": reports.paper_markdown(report, rows, command, _notes(report)), "csv": to_csv(rows)}


def _notes(report: Report) -> list[str]:
    s = report.settings
    notes = []
    for name, why in s.get("dropped", {}).items():
        notes.append(f"{name} left out: {why}.")
    return notes
