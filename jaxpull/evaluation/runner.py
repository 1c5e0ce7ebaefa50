"""Running an evaluation batch by batch, resumable after a kill.

The work is a grid of units: one explainer on one batch of images (every image metric scored on
its maps) or on one batch of Focus mosaics. A unit holds in memory one batch of images and one
explainer's maps of them, never more, so memory does not grow with the number of images.

With a work directory, each finished unit's scores are written to it atomically
(``<explainer key>/images-000003.npz``), next to a ``manifest.json`` of the settings every unit
depends on (protocol, model, images and their labels, seed, batch size, the metrics' settings).
Running the same evaluation again skips the units already written; a run with other settings is
refused before any compute, as ``jaxpull sweep`` refuses a different sweep. Explainer options are
part of the unit's folder name, and a unit stores the metrics it scored, so a rerun that adds
explainers or metrics computes only what is missing. The directory is locked while a run writes
to it.

Under ``jax.distributed`` several processes share one work directory on a shared filesystem
(:func:`run` with a ``group``): each computes its share of the units, and every process then
reads them all, so the results are the same, bit for bit, as one process's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import secrets
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxpull.core.model import Model
from jaxpull.evaluation import metrics, mosaics
from jaxpull.evaluation.imagesource import batches
from jaxpull.evaluation.protocol import Batch, ExplainerSpec, Protocol, build_mosaics, metric_key
from jaxpull.files import outputs
from jaxpull.files.sweep_store import BOOKKEEPING, output_lock

MANIFEST = "manifest.json"
FORMAT = 1


@dataclasses.dataclass
class Job:
    """An evaluation: the ``protocol``'s ``metric_names`` (with every metric's ``settings``) scoring
    the ``explainers`` on the images of ``source`` for ``labels`` ``(N,)``, ``batch`` images per
    unit; Focus on the ``mosaics`` mosaics of ``plan`` (None without Focus)."""

    protocol: Protocol
    model: Model
    source: object  # ImageSource or ArraySource
    labels: np.ndarray
    explainers: list[ExplainerSpec]
    metric_names: list[str]
    settings: dict[str, dict]
    plan: mosaics.MosaicPlan | None
    seed: int
    batch: int
    mosaics: int = 0  # the number of mosaics asked for (the plan's, when Focus is scored)

    def manifest(self) -> dict:
        """The settings every unit depends on (not the explainers, nor which metrics are chosen)."""
        return dict(
            format=FORMAT,
            protocol=self.protocol.name,
            arch=self.model.arch,
            num_classes=self.model.num_classes,
            model=model_fingerprint(self.model),
            images=len(self.source),
            image_shape=list(self.source.shape),
            image_fingerprint=self.source.fingerprint(),
            labels=[int(v) for v in self.labels],
            seed=self.seed,
            batch=self.batch,
            mosaics=self.mosaics,
            metrics=self.settings,
        )


@dataclasses.dataclass
class Results:
    """Per-item scores ``scores[metric][explainer label]`` ``(items,)`` (images, or mosaics for
    Focus); randomisation curves ``curves[label]`` ``(stages, N)`` with ``stage_names``."""

    scores: dict[str, dict[str, np.ndarray]]
    curves: dict[str, np.ndarray]
    stage_names: list[str]


def model_fingerprint(model: Model) -> str:
    """A model's identity: architecture, classes, source and a sample of its weights (the first
    and last parameter tensors' leading bytes: enough to tell two conversions apart, cheap)."""
    h = hashlib.sha256(repr((model.arch, model.num_classes, model.metadata.get("source", ""))).encode())
    leaves = jax.tree_util.tree_leaves(model.params)
    for leaf in leaves[:4] + leaves[-2:]:
        h.update(np.asarray(leaf).tobytes()[:4096])
    return h.hexdigest()


def top1(model: Model, source, batch: int = 16, progress: bool = False) -> np.ndarray:
    """The model's top-1 label ``(N,)`` of every image of ``source``, read batch by batch."""
    from tqdm.auto import tqdm

    out, size = [], min(batch, len(source))
    for s in tqdm(
        list(batches(len(source), batch)), desc="labels (top-1)", unit="batch", disable=None if progress else True
    ):
        out.append(np.asarray(jnp.argmax(model(pad(source.load(s), size)), -1))[: s.stop - s.start])
    return np.concatenate(out).astype(np.int64)


# --------------------------------------------------------------------------------------
# Checks before any compute
# --------------------------------------------------------------------------------------


def check_explainers(
    model: Model, specs: Sequence[ExplainerSpec], shape: tuple[int, ...], drop: bool = False
) -> tuple[list[ExplainerSpec], dict[str, str]]:
    """Trace every explainer once on ``shape`` ``(n, H, W, 3)`` without computing (``jax.eval_shape``):
    a bad option or a GradCAM layer the model lacks is a ValueError naming the explainer before any
    work. With ``drop``, an explainer that cannot run is left out instead; returns the explainers
    kept and, for each one left out, why."""
    kept, dropped = [], {}
    x = jax.ShapeDtypeStruct(tuple(shape), jnp.float32)
    t = np.zeros(shape[0], np.int64)
    for spec in specs:
        fn = spec.map_function(model)
        reason = ""
        try:
            out = jax.eval_shape(lambda x, fn=fn: fn(x, t), x)
            if tuple(out.shape) != tuple(shape):
                raise ValueError(f"gives maps of shape {tuple(out.shape)}, not the images' {tuple(shape)}")
        except (jax.errors.JAXTypeError, jax.errors.JAXIndexError):
            pass  # an explainer that needs concrete values: its checks run when it runs
        except TypeError as e:
            if "keyword argument" not in str(e):
                raise
            word = str(e).split("keyword argument")[-1].strip(" '\"")
            reason = f"does not take the option {word!r} (given: {', '.join(spec.options) or 'none'})"
        except ValueError as e:
            reason = str(e)
        if not reason:
            kept.append(spec)
        elif drop:
            dropped[spec.label] = reason
        else:
            raise ValueError(f"explainer {spec.label}: {reason}")
    return kept, dropped


# --------------------------------------------------------------------------------------
# The work directory
# --------------------------------------------------------------------------------------


def processes(group, work: Path | None = None) -> tuple[int, int]:
    """This process's index and the number of processes: ``group``'s, or 0 of 1 without one.

    Under ``jax.distributed`` with several processes a group is required (without one each
    process would compute everything), and so is ``work``, the directory they share their units
    through: one-line ValueErrors otherwise.
    """
    if group is None:
        if jax.process_count() > 1:
            raise ValueError(
                f"jax.distributed runs {jax.process_count()} processes: give group="
                "jaxpull.shell.distributed.current() so that they share the units"
            )
        return 0, 1
    if group.count > 1 and work is None:
        raise ValueError(
            f"an evaluation over {group.count} processes shares its units through one directory: give "
            "work= (--work-dir) on a filesystem every process sees"
        )
    return group.index, group.count


@contextlib.contextmanager
def work_directory(work: Path | None, manifest: dict, group=None) -> Iterator[Path | None]:
    """Hold the work directory ``work`` (created with its parents if missing) for one run.

    Refuses, before any compute, a directory that holds another evaluation (a different
    manifest), one that is not a work directory, and one another run is writing to (process I of
    ``group`` holds ``.lock.I``, process 0 and a one-process run ``.lock``). Several processes
    check together that they run the same evaluation in one directory they all see, and all stop
    with the same one-line error if not. What the run wrote is removed again if it fails before
    any unit is finished.
    """
    if work is None:
        yield None
        return
    work = Path(work)
    index, count = processes(group, work)
    created, wrote = not work.exists(), False
    names = [f.name for f in work.iterdir()] if work.is_dir() else []  # one listing: others may be writing
    if MANIFEST not in names and any(not BOOKKEEPING.fullmatch(n) for n in names):
        raise ValueError(f"{str(work)!r} is not empty and holds no evaluation: choose another --work-dir")
    try:
        with output_lock(work, index, "evaluation", "--work-dir"):
            problem = ""
            try:
                wrote = _adopt_manifest(work, manifest)
            except ValueError as e:
                if count == 1:
                    raise
                problem = str(e)
            if count > 1:
                _agree(group, work, manifest, problem)
            yield work
    except BaseException:
        _undo(work, created, wrote)
        raise


def _undo(work: Path, created: bool, wrote: bool) -> None:
    """If no unit is finished in ``work``, remove what the run wrote: the directory it created, else
    its manifest and explainer folders (the locks stay with their holders). Best effort: the other
    processes of a failed start clean up at the same time."""
    try:
        if not work.is_dir() or any(p.suffix == ".npz" for p in work.rglob("*")):
            return
        if created:
            shutil.rmtree(work, ignore_errors=True)
        elif wrote:
            (work / MANIFEST).unlink(missing_ok=True)
            for d in work.iterdir():
                if d.is_dir():
                    shutil.rmtree(d, ignore_errors=True)
    except OSError:
        pass


def _adopt_manifest(work: Path, manifest: dict) -> bool:
    """Write ``manifest`` into ``work`` or check it against the one there; whether it wrote it."""
    path = work / MANIFEST
    text = json.dumps(manifest, sort_keys=True, indent=1)
    if not path.is_file():
        outputs.atomic_write(path, lambda tmp: Path(tmp).write_text(text))
        return True
    try:
        recorded = json.loads(path.read_text())
        if not isinstance(recorded, dict):
            raise ValueError("not a manifest")
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"{str(path)!r} is corrupt: delete {str(work)!r} to start the evaluation again") from None
    if recorded != json.loads(text):
        differ = sorted(k for k in set(recorded) | set(manifest) if recorded.get(k) != json.loads(text).get(k))
        raise ValueError(
            f"{str(work)!r} holds an evaluation with other settings ({', '.join(differ)} differ): rerun with its "
            "settings to resume it, or delete it (or choose another --work-dir) to start over"
        )
    return False


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _agree(group, work: Path, manifest: dict, problem: str) -> None:
    """The start of a run over several processes: each tells the others what it runs (a digest of
    every manifest entry), the ``problem`` its checks found, and leaves a token in ``work`` for
    them to read; every process raises the same one-line ValueError if the runs differ, a check
    failed, or a process does not see the others' tokens (each wait bounded by ``group.timeout``)."""
    token, probe = secrets.token_hex(8), work / f".probe.{group.index}"
    if not problem:
        try:
            probe.write_text(token)
        except OSError as e:
            problem = f"cannot write in {str(work)!r} ({e.strerror}): choose another --work-dir"
    mine = dict(manifest={k: _digest(v) for k, v in manifest.items()}, token=token, error=problem)
    hello = [json.loads(v) for v in group.gather("hello", json.dumps(mine), group.timeout)]
    verdict = ""
    for j, h in enumerate(hello):
        first = hello[0]["manifest"]
        differ = sorted(k for k in set(h["manifest"]) | set(first) if h["manifest"].get(k) != first.get(k))
        if differ:
            verdict = (
                f"process {j} runs a different evaluation than process 0 ({', '.join(differ)} differ): give "
                "every process the same command"
            )
            break
    for j, h in enumerate(hello):
        if verdict:
            break
        if h["error"]:
            verdict = f"process {j} of {group.count}: {h['error']}"
        elif j != group.index and _read_text(work / f".probe.{j}") != h["token"]:
            verdict = (
                f"process {group.index} does not see the files process {j} writes in {str(work)!r}: the work "
                "directory must be one directory on a filesystem every process shares (--work-dir)"
            )
    verdicts = group.gather("verdict", verdict, group.timeout)
    probe.unlink(missing_ok=True)
    first_verdict = next((v for v in verdicts if v), None)
    if first_verdict:
        raise ValueError(first_verdict)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _unit_path(work: Path, spec: ExplainerSpec, kind: str, index: int) -> Path:
    return work / spec.key / f"{kind}-{index:06d}.npz"


def _read_unit(path: Path | None) -> dict[str, np.ndarray]:
    if path is None or not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError):
        raise ValueError(
            f"{str(path)!r} is damaged: delete it (it is computed again) or the whole work directory"
        ) from None


def _describe(folder: Path, spec: ExplainerSpec) -> None:
    """``folder/explainer.json``: the explainer and options whose units the folder holds."""
    folder.mkdir(exist_ok=True)
    about = folder / "explainer.json"
    if not about.is_file():
        text = json.dumps(dict(name=spec.name, options=spec.options), sort_keys=True, default=str)
        outputs.atomic_write(about, lambda tmp: Path(tmp).write_text(text))


def _write_unit(path: Path, spec: ExplainerSpec, values: dict[str, np.ndarray], describe: bool = True) -> None:
    """One finished unit, atomically; ``describe``: its folder's explainer.json too (under several
    processes, process 0 writes those: two hosts' writes of one file would race)."""
    if describe:
        _describe(path.parent, spec)
    path.parent.mkdir(exist_ok=True)
    outputs.save_arrays(path, values)


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def _score(job: Job, metric: str, batch: Batch) -> dict[str, np.ndarray]:
    """One metric's scores of one batch: ``{metric: (n,)}`` (and its curve and stage names)."""
    m = job.protocol.metrics[metric]
    out = m.score(batch, **job.settings[metric])
    if m.curve:
        names, curve = out
        return {
            metric: np.asarray(curve)[-1],
            f"{metric}@curve": np.asarray(curve),
            f"{metric}@stages": np.array(names),
        }
    return {metric: np.asarray(out, np.float64)}


def run(job: Job, work: Path | None = None, progress: bool = True, group=None, log=None) -> Results:
    """Score every explainer of ``job`` by each of its metrics, unit by unit (see the module
    docstring); with ``work``, resuming from and writing to that directory. Returns the per-item
    scores in item order.

    Several processes (``group``: ``jaxpull.shell.distributed.current()``, or any object with its
    ``index``, ``count``, ``timeout``, ``gather``, ``post_error`` and ``error``) split the
    (unit, explainer) pairs by position, pair j to process j % count, in the directory ``work``
    they share: each computes its pairs missing there, waits for the others (without a time limit:
    the runtime's heartbeats find a process that died), then reads every pair; all return the same
    results. ``log`` gets a line on each process's share.
    """
    from tqdm.auto import tqdm

    index, count = processes(group, work)
    image_metrics = [m for m in job.metric_names if job.protocol.metrics[m].on == "images"]
    mosaic_metrics = [m for m in job.metric_names if job.protocol.metrics[m].on == "mosaics"]
    units: list[tuple[str, int, slice, list[str]]] = []
    if image_metrics:
        units += [("images", i, s, image_metrics) for i, s in enumerate(batches(len(job.labels), job.batch))]
    if mosaic_metrics and job.plan is not None:
        units += [("mosaics", i, s, mosaic_metrics) for i, s in enumerate(batches(len(job.plan.targets), job.batch))]
    pairs = [(kind, i, rows, wanted, spec) for kind, i, rows, wanted in units for spec in job.explainers]
    collected: dict[tuple[str, str, int], dict[str, np.ndarray]] = {}

    with work_directory(work, job.manifest(), group) as wd:
        todo = []
        for kind, i, rows, wanted, spec in pairs[index::count]:
            path = None if wd is None else _unit_path(wd, spec, kind, i)
            have = _read_unit(path)
            collected[(spec.key, kind, i)] = have
            if any(m not in have for m in wanted):
                todo.append((kind, i, rows, wanted, spec, path))
        mine = len(pairs[index::count])
        who = f" (process {index} of {count})" if count > 1 else ""
        bar = tqdm(
            total=mine, initial=mine - len(todo), desc="evaluate" + who, unit="unit", disable=None if progress else True
        )
        if count == 1:
            _compute(job, todo, collected, bar)
        else:
            if log is not None:
                log(f"process {index} of {count}: {len(todo)} of its {mine} units to compute (of {len(pairs)})")
            if index == 0:  # the explainers' folders are described once, by one process
                for spec in job.explainers:
                    _describe(wd / spec.key, spec)
            _compute_with(group, job, todo, collected, bar)
            for kind, i, _, wanted, spec in (p for j, p in enumerate(pairs) if j % count != index):
                collected[(spec.key, kind, i)] = _finished_unit(_unit_path(wd, spec, kind, i), wanted, wd)
        bar.close()
    return _gather(job, units, collected)


def _compute(job: Job, todo: list, collected: dict, bar, group=None) -> None:
    """Compute the pairs ``todo`` into ``collected`` (and their files), each batch read once; with
    ``group``, stop when another process posted an error."""
    size = job_batch(job)
    loaded: tuple[tuple[str, int] | None, tuple | None] = (None, None)
    for kind, index, rows, wanted, spec, path in todo:
        if loaded[0] != (kind, index):  # the units are ordered by batch: each batch is read once
            if kind == "images":
                x, labels, quadrants = job.source.load(rows), job.labels[rows], None
            else:
                x = build_mosaics(job.protocol, job.source, job.plan, rows, job.settings["focus"])
                labels, quadrants = job.plan.targets[rows], job.plan.quadrants[rows]
            loaded = ((kind, index), tuple(pad(a, size) for a in (x, labels, quadrants)))
        x, labels, quadrants = loaded[1]
        bar.set_postfix_str(f"{spec.label} on {kind} {rows.start}-{rows.stop - 1}")
        explain = spec.map_function(job.model)
        maps = explain(x, labels)
        values = dict(collected[(spec.key, kind, index)])
        for metric in wanted:
            if metric in values:
                continue
            key, seed = metric_key(job.seed, metric, index)
            batch = Batch(job.model, x, labels, maps, explain, spec.model_function(), key, seed, quadrants)
            n = rows.stop - rows.start  # the padding's scores dropped
            values.update({k: v[..., :n] if "@stages" not in k else v for k, v in _score(job, metric, batch).items()})
        if path is not None:
            _write_unit(path, spec, values, describe=group is None)
        collected[(spec.key, kind, index)] = values
        bar.update(1)
        if group is not None and group.error() is not None:
            raise ValueError(group.error())


def _compute_with(group, job: Job, todo: list, collected: dict, bar) -> None:
    """:func:`_compute` on one of several processes, then wait for all of them to finish theirs:
    a failure anywhere is posted, and every process raises it once all have stopped."""
    failure = None
    try:
        _compute(job, todo, collected, bar, group)
    except Exception as e:
        failure = e
    status = f"process {group.index} of {group.count}: {failure}" if failure is not None else ""
    if status:
        group.post_error(status)
    statuses = [json.loads(v) for v in group.gather("finished", json.dumps({"error": status}), None)]
    if failure is not None:
        raise failure
    first = next((s["error"] for s in statuses if s.get("error")), None)
    if first:
        raise ValueError(first)


def _finished_unit(path: Path, wanted: Sequence[str], work: Path) -> dict[str, np.ndarray]:
    """The scores another process wrote to ``path``; a one-line ValueError if any is missing."""
    have = _read_unit(path)
    if any(m not in have for m in wanted):
        raise ValueError(
            f"{str(path)!r} is missing after every process finished: is {str(work)!r} one directory every "
            "process sees? Run the same command again to compute it"
        )
    return have


def job_batch(job: Job) -> int:
    """The items of every unit: the last batch is padded to it, so every batch compiles once."""
    return min(job.batch, len(job.labels))


def pad(a: np.ndarray | None, size: int) -> np.ndarray | None:
    """``a`` ``(n, ...)`` with its last item repeated up to ``size`` items (None stays None)."""
    if a is None or len(a) >= size:
        return a
    return np.concatenate([a, np.repeat(a[-1:], size - len(a), axis=0)])


def _gather(job: Job, units, collected) -> Results:
    scores: dict[str, dict[str, np.ndarray]] = {m: {} for m in job.metric_names}
    curves: dict[str, np.ndarray] = {}
    stage_names: list[str] = []
    for metric in job.metric_names:
        on = job.protocol.metrics[metric].on
        for spec in job.explainers:
            parts = [collected[(spec.key, kind, index)] for kind, index, _, _ in units if kind == on]
            scores[metric][spec.label] = (
                np.concatenate([p[metric] for p in parts]).astype(np.float64) if parts else np.zeros(0)
            )
            if job.protocol.metrics[metric].curve and parts:
                curves[spec.label] = np.concatenate([p[f"{metric}@curve"] for p in parts], axis=1)
                stage_names = [str(s) for s in parts[0][f"{metric}@stages"]]
    return Results(scores, curves, stage_names)


def check_randomization(model: Model, shape: tuple[int, ...]) -> None:
    """The cascading randomisation's layer probe at the images' own size ``(H, W)`` (fixed-size
    models such as ViT need it); ValueError if the model has no parameterised layer."""
    if not metrics.layer_order(model, tuple(shape[:2])):
        raise ValueError(f"randomization: {model.arch} has no layers with parameters to randomise")
