"""The commands' work, one function each, callable from Python: ``jaxpull explain``, ``demo``,
``sweep`` and ``evaluate`` are argument parsing plus one call here.

Each function checks every setting and output path before any compute, reports through ``log``
(``print`` by default) and writes its files atomically.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxpull.core import checks, models, settings, targets
from jaxpull.core.model import Model
from jaxpull.core.settings import PRESETS
from jaxpull.shell.finite import changed_settings, require_finite

Log = Callable[[str], None]

# ``explain``'s methods: figure headings.
HEADINGS = {"pullback": "excitation pullback (PGA, x_K - x_0)", "vanilla": "vanilla gradient (PGA, x_K - x_0)"}


def warn(message: str) -> None:
    """A one-line note on stderr."""
    print(f"jaxpull: note: {message}", file=sys.stderr)


def note_unused_pool_settings(given: Mapping[str, Any], model: Model, log: Log = warn) -> None:
    """Say when a pool setting was given for a model without max-pools (it has no effect there)."""
    flags = [f"--{n.replace('_', '-')}" for n in ("pool_temperature", "max_pool") if n in given]
    if flags and not models.get(model.arch).max_pools:
        log(f"{' and '.join(flags)} has no effect: {model.arch} has no max-pools")


def explain_images(
    model: Model,
    x: np.ndarray,
    target_ids: np.ndarray,
    methods: Sequence[str],
    options: Mapping[str, Any],
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Ascent differences x_K - x_0 per method (``"pullback"``, ``"vanilla"``), one image at a time
    (bounded memory): ``x`` ``(N, H, W, 3)``, ``target_ids`` ``(N, K)`` -> ``{method: (N, K, H, W, 3)}``.

    ``options``: ``jaxpull.ascent`` keywords (``rules`` and flat settings); the vanilla gradient runs
    the same ascent under ``rules="vanilla"`` and drops the rule settings.
    """
    from tqdm import tqdm

    import jaxpull

    options = dict(options)
    rules = options.pop("rules", settings.DEFAULT_RULES)
    rule_settings, ascent_settings = settings.split(options)
    calls = {
        "pullback": dict(rules=rules, **rule_settings, **ascent_settings),
        "vanilla": dict(rules="vanilla", ascent=rules if isinstance(rules, str) else None, **ascent_settings),
    }
    results = {m: np.zeros(target_ids.shape + x.shape[1:], np.float32) for m in methods}
    jobs = [(m, i) for m in methods for i in range(len(x))]
    for m, i in tqdm(jobs, desc="explaining", unit="image", disable=not progress or len(jobs) < 2):
        diff = jaxpull.ascent(model, x[i : i + 1], target_ids[i : i + 1], output="diff", **calls[m])
        results[m][i] = np.asarray(diff)[0]
    return results


def explain(
    model_name: str,
    image_paths: Sequence[str],
    out: str,
    *,
    target_spec: str = "top3",
    method: str = "both",
    arrays_path: str | None = None,
    rules: str = settings.DEFAULT_RULES,
    log: Log = print,
    progress: bool = True,
    **given,
) -> dict[str, np.ndarray]:
    """``jaxpull explain``: the paper's figure of ascent differences for ``image_paths``.

    ``target_spec``: see :func:`jaxpull.core.targets.resolve_targets`; ``method``: pullback,
    vanilla or both; ``given``: gate and ascent settings overriding the preset ``rules``. Writes
    the figure ``out`` (.png) and, with ``arrays_path``, the raw arrays (.npz). Returns the results.
    """
    from jaxpull.files import cache, images, outputs
    from jaxpull.shell import figures

    checks.choice(method, ("pullback", "vanilla", "both"), "method")
    rule_set, ascent = settings.resolve_both(rules, **given)  # every setting checked before any work
    record = settings.record(rule_set, ascent, rules if isinstance(rules, str) else None)
    out = outputs.check_output(out, ".png")
    arrays_path = outputs.check_output(arrays_path, ".npz") if arrays_path else None
    model = cache.resolve(model_name, log=log)
    x = images.load_images(image_paths, **model.preprocessing.image_options)  # the sizes its weights expect
    note_unused_pool_settings(given, model)
    logits = np.asarray(model(x))
    target_ids = targets.resolve_targets(model, logits, target_spec)
    names = [Path(p).stem for p in image_paths]
    for line in targets.top5_lines(model, names, logits):
        log(line)
    methods = ["pullback", "vanilla"] if method == "both" else [method]
    results = explain_images(model, x, target_ids, methods, dict(rules=rules, **given), progress)
    suspects = changed_settings(rule_set, ascent, rules if isinstance(rules, str) else None)
    for m, d in results.items():  # no figure of NaN: name the settings instead
        require_finite(d, f"the {m} ascent differences", suspects)
    titles = [[figures.short_name(model.class_name(int(t))) for t in row] for row in target_ids]
    figures.explanation_figure(x, {HEADINGS[m]: d for m, d in results.items()}, titles, out)
    log(f"wrote {out}")
    if arrays_path:
        meta = {k: np.asarray(np.nan if v is None else v) for k, v in record.items()}  # None: eps without a ball
        outputs.save_arrays(
            arrays_path,
            dict(
                images=x,
                targets=target_ids,
                image_names=np.array(names),
                **{f"{m}_diff": d for m, d in results.items()},
                **meta,
            ),
        )
        log(f"wrote {arrays_path}")
    return results


def _rules_text(name: str) -> str:
    """One line of a preset's settings, read from :data:`jaxpull.core.settings.PRESETS`."""
    p = PRESETS[name]
    relu, pool, a = p.rules.relu, p.rules.max_pool, p.ascent
    gate = {"sigmoid": "sigmoid", "normal_cdf": "normal-CDF"}.get(relu.gate, relu.gate)
    ball = f"L2 ball eps {a.eps:g}" if a.project else "no L2 ball"
    clip = {"every": "clamp to [-1, 1] after every step", "last": "clamp after the last step", "none": "no clamping"}
    return (
        f"{gate} gate t {relu.temperature:g}, {pool.mode} max-pool weights tp {pool.temperature:g}, {ball}, "
        + (clip[a.clip])
    )


def demo_caption(model_name: str, max_pools: bool = True) -> str:
    """What the paper figure shows and with which settings."""
    a = PRESETS["excitation"].ascent
    pools = "" if max_pools else " (it has no max-pools, so the max-pool settings play no part)"
    return (
        f"Each cell is x_K - x_0: how {a.steps} steps of projected gradient ascent (step {a.alpha:g} in the L2 norm) "
        "on the column's class logit change the photo x_0, min-max normalised per cell (grey: no change). "
        "The forward pass is exact; only the backward pass differs between rows. Framed: the photo's own top-1 class; "
        f"the other columns are counterfactual classes, the last one random. Model: {model_name}{pools}.\n"
        f"excitation (the paper's first version): {_rules_text('excitation')}.\n"
        f"semantic (its current version): {_rules_text('semantic')}.\n"
        "vanilla gradient: hard gates (the plain gradient), ascent as in excitation."
    )


def paper_figure(
    model: Model,
    x: np.ndarray,
    names: list[str],
    out,
    *,
    seed: int = 0,
    methods: Mapping[str, Mapping[str, Any]] = settings.COMPARISON,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """The paper's figure: per method a block of rows (one per image) over the columns of
    :func:`jaxpull.core.targets.paper_layout`, written to ``out`` (.png).

    ``x`` ``(N, H, W, 3)``; ``methods``: row label -> ``jaxpull.ascent`` keywords. Returns
    ``{method: (N, K, H, W, 3)}`` ascent differences, computed one image at a time.
    """
    from tqdm import tqdm

    import jaxpull
    from jaxpull.shell import figures

    logits = np.asarray(model(x))
    columns, own = targets.paper_layout(logits, seed)
    results = {m: np.zeros((len(x), len(columns)) + x.shape[1:], np.float32) for m in methods}
    jobs = [(m, i) for m in methods for i in range(len(x))]
    for m, i in tqdm(jobs, desc="explaining", unit="image", disable=not progress):
        diff = jaxpull.ascent(model, x[i : i + 1], columns[None], output="diff", **methods[m])
        results[m][i] = np.asarray(diff)[0]
    source = model.metadata.get("source", "unknown").split(" | ")[0]
    figures.comparison_figure(
        x,
        results,
        [figures.short_name(model.class_name(int(t))) for t in columns],
        names,
        out,
        own_columns=own,
        title=f"Excitation pullbacks vs the vanilla gradient on {model.arch}",
        caption=demo_caption(f"{model.arch}, weights {source}", models.get(model.arch).max_pools),
    )
    return results


def demo(model_name: str, out: str, seed: int = 0, log: Log = print) -> dict[str, np.ndarray]:
    """``jaxpull demo``: :func:`paper_figure` of the offline sample photos."""
    from jaxpull.files import cache, images, outputs

    out = outputs.check_output(out, ".png")
    checks.seed(seed)
    paths = images.sample_paths()
    model = cache.resolve(model_name, log=log)
    x = images.load_images(paths, **model.preprocessing.image_options)  # the sizes its weights expect
    names = [p.stem for p in paths]
    log(f"model {model.arch} ({model.metadata.get('source', 'unknown source')})")
    for line in targets.top5_lines(model, names, np.asarray(model(x))):
        log(line)
    results = paper_figure(model, x, names, out, seed=seed)
    log(f"wrote {out}")
    return results


def sweep(
    model_name: str,
    image_paths: Sequence[str],
    out: str,
    *,
    labels: str = "all",
    temperatures=None,
    method: str = "pullback",
    reduce: str = "alignment",
    memory_budget: float = 2 * 2**30,
    chunk_size: int | None = None,
    rules: str = settings.DEFAULT_RULES,
    log: Log = print,
    processes=None,
    **given,
) -> dict[str, np.ndarray]:
    """``jaxpull sweep``: :func:`jaxpull.shell.sweep.sweep` over image files and a label spec
    (:func:`jaxpull.core.targets.parse_labels`), logging each image's most aligned labels.

    ``processes``: a :class:`jaxpull.shell.distributed.Settings` to join JAX's distributed runtime
    first (after every setting is checked, before the model loads), or None for one process.
    """
    from jaxpull.core import sweep as core_sweep
    from jaxpull.shell import distributed

    settings.resolve_both(rules, **given)  # every setting checked before any work
    core_sweep.check_budget(memory_budget)
    if chunk_size is not None:
        core_sweep.chunk_for_size(chunk_size, 1, 1)

    def work() -> dict[str, np.ndarray]:
        return _sweep_files(
            model_name,
            image_paths,
            out,
            labels,
            temperatures,
            method,
            reduce,
            memory_budget,
            chunk_size,
            rules,
            log,
            given,
        )

    if processes is not None:
        return distributed.joined(processes, out, work)
    return work()


def _sweep_files(
    model_name, image_paths, out, labels, temperatures, method, reduce, memory_budget, chunk_size, rules, log, given
) -> dict[str, np.ndarray]:
    import jax

    from jaxpull.files import cache, images
    from jaxpull.shell import sweep as sweeps

    model = cache.resolve(model_name, log=log)
    x = images.load_images(image_paths, **model.preprocessing.image_options)
    note_unused_pool_settings(given, model)
    result = sweeps.sweep(
        model,
        x,
        targets.parse_labels(labels, model),
        temperatures,
        method=method,
        reduce=reduce,
        out=out,
        memory_budget=memory_budget,
        chunk_size=chunk_size,
        rules=rules,
        **given,
    )
    if jax.process_index() != 0:  # process 0 speaks for a distributed sweep
        return result
    log(f"wrote {', '.join(f'{k}.npy {tuple(v.shape)}' for k, v in result.items())} to {out}")
    if "top_labels" in result:  # finite: the sweep refuses non-finite alignments
        shown = [settings.resolve(rules).relu.temperature] if temperatures is None else temperatures
        for name, row in zip(image_paths, result["top_labels"], strict=True):
            for t, top in zip(shown, row, strict=True):
                log(
                    f"{Path(name).stem} t={t}: most aligned labels "
                    + ", ".join(model.class_name(int(i)) for i in top[:5])
                )
    return result


def evaluate(
    image_sources: Sequence[str],
    model_name: str,
    out: str,
    *,
    protocol: str = "quick",
    explainer_names: Sequence[str] | None = None,
    metric_names: Sequence[str] | None = None,
    labels: str = "top1",
    limit: int | None = None,
    mosaics: int | None = None,
    stages: int = 6,
    sensitivity_samples: int | None = None,
    rules: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    samples: int | None = None,
    resamples: int | None = None,
    seed: int | None = None,
    batch_size: int | None = None,
    gradcam_layer: str | None = None,
    focus_images: str | None = None,
    work_dir: str | None = None,
    command: str = "",
    log: Log = print,
    progress: bool = True,
    processes=None,
) -> str:
    """``jaxpull evaluate``: :func:`jaxpull.evaluation.pipeline.run_evaluation` on image files,
    folders or ``["samples"]`` (the offline photos), streamed in batches; written as ``out`` (.md)
    and a .csv beside it in the ``protocol``'s layout (``"quick"`` or ``"paper"``).

    ``rules``: the pullback explainers' preset (default: ``"semantic"`` for the paper protocol, the
    paper's current rules; jaxpull's default for the quick one); the rule settings of ``overrides``
    apply to the pullback explainers, its ascent settings to every ascent, ``samples`` to the
    noisy ones (SmoothGrad, FusionGrad, GradientShap and their pullback forms), ``gradcam_layer`` to the GradCAM ones. ``labels``: ``"top1"``, ``"folders"``
    (an ImageNet-style folder: each class folder's WordNet id, class name or index) or a comma
    list, one per image. Every finished batch is kept in ``work_dir`` (default: ``out`` with the suffix ``.work``, removed once the
    report is written): a killed run resumes from it. Every check runs before any compute.
    Returns the markdown.

    Several processes: ``processes``, a :class:`jaxpull.shell.distributed.Settings` to join JAX's
    distributed runtime (after every setting is checked, before the model loads), or a runtime
    joined before with :func:`jaxpull.shell.distributed.initialize`. Every process runs the same
    call with one ``work_dir`` on a filesystem they all share (required); each computes its share
    of the units, and process 0 writes the report, the same bytes as one process's (the others
    return "").
    """
    from jaxpull.evaluation import imagesource, pipeline, protocol as protocols
    from jaxpull.files import cache, images, outputs
    from jaxpull.shell import distributed

    out = outputs.check_output(out, ".md")
    csv_path = outputs.check_output(str(out.with_suffix(".csv")), ".csv")
    proto = protocols.get(protocol)
    pipeline.check_counts(
        limit=limit,
        mosaics=mosaics,
        stages=stages,
        samples=samples,
        resamples=resamples,
        sensitivity_samples=sensitivity_samples,
        batch_size=batch_size,
    )
    if seed is not None:
        checks.seed(seed)
    if proto.name == "paper" and sensitivity_samples is not None:
        raise ValueError("--sensitivity-samples is the quick protocol's: the paper's Max-Sensitivity draws 10")
    if proto.name == "quick" and focus_images is not None:
        raise ValueError("--focus-images chooses the paper's mosaics: use it with --protocol paper")
    if rules is None:  # the paper's explainers run its current rules; the quick protocol jaxpull's default
        rules = "semantic" if proto.name == "paper" else settings.DEFAULT_RULES
    rule_settings, ascent_settings = settings.split(overrides or {})
    settings.resolve_both(rules, **rule_settings, **ascent_settings)  # checked before any work
    if processes is not None and (processes.num_processes or 1) > 1 and not work_dir:
        raise _shared_work_dir(processes.num_processes)
    work = Path(work_dir) if work_dir else out.with_suffix(".work")
    if not work.is_dir():
        outputs.check_output(work, what="work directory")  # its folder exists and is writable
    if list(image_sources) == ["samples"]:
        found = images.evaluation_photos()
        if len(found) < 3:
            raise ValueError("too few offline photos found: pip install matplotlib scikit-image (or 'jaxpull[demo]')")
        paths, folders = list(found.values()), None
        paths = paths[:limit] if limit else paths
    else:
        paths, folders = imagesource.find_images(image_sources, limit)
    if labels == "folders" and folders is None:
        raise ValueError("--labels folders needs one folder of class subfolders (ImageNet style) as --images")

    def run() -> str:
        timeout = distributed.DEFAULT_TIMEOUT if processes is None else processes.timeout
        group = distributed.current(timeout, "evaluation")
        if group.count > 1 and not work_dir:
            raise _shared_work_dir(group.count)
        model = cache.resolve(model_name, log=log)
        source = imagesource.ImageSource(
            tuple(paths), None if folders is None else tuple(folders), **model.preprocessing.image_options
        )
        names = protocols.explainer_names(proto, explainer_names)
        specs = protocols.explainer_specs(proto, names, rules, rule_settings, ascent_settings, samples, gradcam_layer)
        if labels == "folders":
            chosen = imagesource.folder_classes(folders, model.num_classes, model.class_names)
        elif labels == "top1":
            chosen = None  # the model's top-1, computed once every setting is checked
        else:
            chosen = [model.label(name.strip()) for name in labels.split(",") if name.strip()]
            if len(chosen) != len(paths):
                raise ValueError(f"--labels gives {len(chosen)} labels for {len(paths)} images: give one per image")
        note_unused_pool_settings(rule_settings, model)
        report = pipeline.run_evaluation(
            model,
            source,
            chosen,
            specs,
            protocol=proto.name,
            metric_names=metric_names,
            mosaics=mosaics,
            stages=stages,
            sensitivity_samples=10 if sensitivity_samples is None else sensitivity_samples,
            focus_images=focus_images or "repeated",
            seed=seed,
            batch=batch_size,
            drop_unavailable=explainer_names is None or list(explainer_names) == ["all"],
            work=work,
            progress=progress,
            extra_settings=dict(
                labels={"folders": "class folders", "top1": "the model's top-1"}.get(labels, "given"), rules=rules
            ),
            group=group,
            log=log,
        )
        if group.index > 0:
            log(f"process {group.index} of {group.count} finished its units: process 0 writes {out} and {csv_path}")
            return ""
        texts = pipeline.render(report, command, resamples)
        used = report.settings["labels_used"]
        names = [f"{n} ({t} {model.class_name(t)})" for n, t in zip(source.names, used, strict=True)]
        shown = ", ".join(names if len(names) <= 60 else names[:60] + [f"... ({len(names) - 60} more)"])
        text = texts["md"] + "\nImages: " + shown + "\n"
        outputs.atomic_write(csv_path, lambda tmp: Path(tmp).write_text(texts["csv"]))
        outputs.atomic_write(out, lambda tmp: Path(tmp).write_text(text))
        log(text)
        if work_dir:
            log(f"wrote {out} and {csv_path}; every batch's scores are kept in {work} (a rerun reuses them)")
        else:
            shutil.rmtree(work, ignore_errors=True)
            log(f"wrote {out} and {csv_path}")
        return text

    if processes is not None:
        return distributed.joined(processes, work_dir, run, "evaluation", "--work-dir")
    return run()


def _shared_work_dir(count: int) -> ValueError:
    return ValueError(
        f"an evaluation over {count} processes shares its units through one work directory: give --work-dir "
        "(work_dir) on a filesystem every process sees"
    )
