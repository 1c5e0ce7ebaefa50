"""Sweeps: images x labels x temperatures, in chunks that fit a memory budget, streamed to disk.

The pieces: :mod:`jaxpull.core.sweep` (the unit kernel, the units as spans of label positions,
the memory plan), :mod:`jaxpull.files.sweep_store` (the output directory: lock, manifests, one
file per finished unit, the result) and :mod:`jaxpull.shell.distributed` (several processes);
here, the loop and its progress.

A sweep is a grid of work units, one per (image, temperature, chunk of labels). Each unit is
one jitted call (the label chunk is padded to a fixed size, so every unit reuses one compiled
function; temperatures are traced). The chunk comes from a bound on the memory one label needs
(``jaxpull.core.sweep.footprint``), so a 1000-label sweep of a 224x224 image never holds more
than the budget on the device, and with a reduction (``"norms"``, ``"alignment"``) never holds
the maps on the host either.

With ``out`` set, each finished unit is saved under a name that says which labels it covers, and
the result goes to ``.npy`` files numpy can memory-map (``np.load(path, mmap_mode="r")``) with a
``manifest.json``; running the same sweep again resumes where it stopped, with any chunk and any
number of devices, and a different sweep in the same directory is refused before any compute.

With several local devices (GPUs, a TPU slice, or CPU devices forced with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``) the label axis of every chunk is sharded
across them (a one-axis ``Mesh`` and ``NamedSharding``). Under ``jax.distributed`` (several
processes, e.g. one per host: ``jaxpull sweep --coordinator HOST:PORT --num-processes N
--process-id I``, or :func:`jaxpull.shell.distributed.initialize` in Python) the processes split
the units by ``jax.process_index()`` and all write into one ``out`` directory on a shared
filesystem; the result files are the same, byte for byte, as one process's.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import secrets
from collections.abc import Iterable, Sequence
from pathlib import Path

import jax
import numpy as np

from jaxpull.core import checks, settings, sweep as core
from jaxpull.core.model import Model
from jaxpull.core.sweep import METHODS, REDUCTIONS, Plan, Span, unit  # noqa: F401  (``unit``: the kernel, patched by tests)
from jaxpull.files import sweep_store
from jaxpull.files.sweep_store import MANIFEST, SweepStore, output_lock  # noqa: F401
from jaxpull.shell import distributed
from jaxpull.shell.finite import changed_settings, require_finite

FORMAT = sweep_store.FORMAT


def plan(
    model: Model,
    image_shape,
    method: str = "pullback",
    reduce: str = "maps",
    *,
    memory_budget: float = 2 * 2**30,
    chunk_size: int | None = None,
    num_labels: int = 1000,
    devices: Sequence[jax.Device] | None = None,
    ascent: settings.Ascent | None = None,
    rules=settings.DEFAULT_RULES,
) -> Plan:
    """The labels per unit of a sweep (:func:`jaxpull.core.sweep.plan`), from a preset's name or
    a :class:`jaxpull.Rules` and its ascent (default: the preset's).

    Raises:
      ValueError: if the budget is too small for one label per device (before any compute).
    """
    budget = core.check_budget(memory_budget)
    ascent = settings.resolve_ascent(rules) if ascent is None else ascent
    return core.plan(
        model,
        tuple(image_shape),
        method,
        reduce,
        settings.resolve(rules),
        ascent,
        memory_budget=budget,
        chunk_size=chunk_size,
        num_labels=num_labels,
        m=core.mesh(devices),
    )


def _fingerprint(model: Model, x: np.ndarray, config: dict) -> str:
    """Identity of a sweep: its configuration, the images, and a sample of the weights (first
    and last layers' leading bytes: enough to tell two conversions apart, cheap for big models)."""
    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True).encode())
    h.update(np.ascontiguousarray(x).tobytes())
    for leaf in jax.tree_util.tree_leaves(model.params)[:4] + jax.tree_util.tree_leaves(model.params)[-2:]:
        h.update(np.asarray(leaf).tobytes()[:4096])
    return h.hexdigest()


def _out_of_memory(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or (isinstance(e, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(e))


class _Runner:
    """Computes units: one image, one rule set, labels padded to ``width`` (one compiled function)."""

    def __init__(self, model, x, labels, rule_sets, ascent, method, reduce, m, width, describe):
        self.model, self.x, self.labels, self.rule_sets, self.ascent = model, x, labels, rule_sets, ascent
        self.method, self.reduce, self.mesh, self.width, self.describe = method, reduce, m, width, describe

    def __call__(self, span: Span) -> np.ndarray:
        args = core.place(
            self.model,
            self.x[span.image : span.image + 1],
            core.padded_labels(self.labels, span, self.width),
            self.rule_sets[span.temp],
            self.ascent,
            self.mesh,
        )
        try:
            with self.model.sized(self.x.shape):
                value = np.asarray(unit(*args, method=self.method, reduce=self.reduce))[: span.size]
        except (MemoryError, jax.errors.JaxRuntimeError) as e:
            if not _out_of_memory(e):
                raise
            raise ValueError(
                f"out of memory computing a unit of {self.width} labels: use a smaller --chunk-size or "
                "--memory-budget (chunk_size / memory_budget); finished units are kept and any chunk resumes them"
            ) from None
        what = (
            f"the {self.method} {self.reduce} of image {span.image}, temperature #{span.temp}, "
            f"labels {span.start}-{span.stop - 1}"
        )
        require_finite(value, what, self.describe(span.temp))
        return value


def sweep(
    model: Model,
    x,
    labels: Sequence[int],
    temperatures: Sequence[float | None] | None = None,
    *,
    method: str = "pullback",
    reduce: str = "maps",
    out: os.PathLike | None = None,
    memory_budget: float = 2 * 2**30,
    chunk_size: int | None = None,
    rules=settings.DEFAULT_RULES,
    progress: bool = True,
    devices: Sequence[jax.Device] | None = None,
    timeout: float = distributed.DEFAULT_TIMEOUT,
    **overrides,
) -> dict[str, np.ndarray]:
    """Run ``method`` for every image x temperature x label, in memory-bounded chunks.

    Args:
      model: a converted model.
      x: images ``(N, H, W, 3)`` in [-1, 1].
      labels: the L class indices to explain (e.g. ``range(1000)``).
      temperatures: the T ReLU temperatures (``None`` for the exact gradient, ``rules="vanilla"``);
        default: the one of ``rules``.
      method: ``"pullback"`` or ``"ascent"``.
      rules: a preset's name or a :class:`jaxpull.Rules`; ``overrides``: flat rule and ascent settings
        (as :func:`jaxpull.ascent` takes them; the preset ``rules`` also gives the ascent settings not given).
      reduce: ``"maps"`` keeps every map ``(N, T, L, H, W, 3)``; ``"norms"`` keeps ``(N, T, L)``
        L2 norms; ``"alignment"`` keeps ``(N, T, L)`` cosines between map and image, and
        ``top_labels`` ``(N, T, L)``, the labels sorted by alignment.
      out: a directory for memory-mappable ``.npy`` results and the resumable manifest (created
        with any missing parents, and locked while the sweep runs: a second sweep into it is
        refused); None keeps results in memory. Required under ``jax.distributed`` with several
        processes: one directory every process shares.
      memory_budget: bytes of device memory a unit may use (default 2 GiB); or ``chunk_size``
        (labels per unit, at most L; rounded up to a multiple of the local device count).
      timeout: seconds the processes of a distributed sweep wait for each other at the start.
    Returns:
      name -> array (``np.memmap`` when ``out`` is set): ``maps`` or ``norms`` / ``alignment``
      (+ ``top_labels``).
    Raises:
      ValueError: a bad setting, a directory holding something else, or results that are not
        finite (NaN or inf: nothing is written for them; the message names the settings).
    """
    x = np.asarray(checks.images(x))
    checks.choice(method, METHODS, "method")
    checks.choice(reduce, REDUCTIONS, "reduce")
    labels = np.asarray(checks.targets(np.asarray(labels), 1, model.num_classes))[0]
    budget = core.check_budget(memory_budget)
    if chunk_size is not None:
        core.chunk_for_size(chunk_size, 1, 1)
    if "temperature" in overrides:
        raise ValueError("sweep takes temperatures (a list), not temperature: give temperatures=[...]")
    base, ascent = settings.resolve_both(rules, **overrides)
    temperatures = [base.relu.temperature] if temperatures is None else list(temperatures)
    if not temperatures:
        raise ValueError("temperatures is empty: give at least one (None for the exact gradient)")
    # a None temperature is the exact gradient (the CLI's --method vanilla): every rule plain
    rule_sets = [settings.VANILLA if t is None else base.replace(temperature=t) for t in temperatures]
    n, L, T = len(x), len(labels), len(temperatures)
    shapes = core.result_shapes(reduce, n, T, L, x.shape[1:])
    preset = rules if isinstance(rules, str) else None

    def describe(k: int) -> list[str]:
        """The settings to blame for non-finite results under temperature ``k``."""
        return changed_settings(
            base if temperatures[k] is None else rule_sets[k], ascent if method == "ascent" else None, preset
        )

    config = dict(
        arch=model.arch,
        source=model.metadata.get("source", ""),
        images=list(x.shape),
        labels=labels.tolist(),
        temperatures=temperatures,
        method=method,
        reduce=reduce,
        rules=preset or "custom",
        rule_settings=[r.settings() for r in rule_sets],
        ascent={n: s.get(ascent) for n, s in settings.ASCENT_SETTINGS.items()},
        format=FORMAT,
    )  # the sweep's identity (with the images and weights: _fingerprint), recorded in its manifests
    group = distributed.current(timeout)
    if group.count > 1 and out is None:
        raise ValueError(
            f"a sweep over {group.count} processes writes into one directory they share: give out= (--out)"
        )
    m = core.mesh(devices)
    n_dev = m.devices.size
    make_plan = functools.partial(
        core.plan,
        model,
        x.shape[1:],
        method,
        reduce,
        base,
        ascent,
        memory_budget=budget,
        chunk_size=chunk_size,
        num_labels=L,
        m=m,
    )

    def runner(chunk: int) -> _Runner:
        width = -(-chunk // n_dev) * n_dev
        return _Runner(model, x, labels, rule_sets, ascent, method, reduce, m, width, describe)

    if out is None:
        chunk = make_plan().chunk
        units = _bar(core.chunks(n, T, L, chunk), 0, chunk, group, progress)
        return _in_memory(runner(chunk), units, shapes, labels)

    store = SweepStore(out, _fingerprint(model, x, config), config, shapes, group.index, group.count)
    with output_lock(out, group.index):
        chunk = _start(store, make_plan, group, timeout)
        if chunk is None:  # finished before
            return store.results()
        done = store.done()
        mine = core.share(core.chunks(n, T, L, chunk), group.index, group.count)
        left = [core.missing(u, done) for u in mine]
        todo = [g for gaps in left for g in gaps]
        store.begin(chunk)
        run, failure = runner(chunk), None
        try:
            for span in _bar(todo, sum(not g for g in left), chunk, group, progress):
                store.write_unit(span, run(span))
                if group.count > 1 and group.error() is not None:
                    raise ValueError(group.error())
        except Exception as e:
            failure = e
        return _finish(store, group, labels, failure)


def _in_memory(run: _Runner, units: Iterable[Span], shapes: dict, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Every unit of ``units`` (a progress bar over them) into arrays in memory (``out=None``)."""
    results = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    name = next(iter(results))
    for span in units:
        results[name][span.image, span.temp, span.start : span.stop] = run(span)
    if "alignment" in results:
        results["top_labels"] = labels[np.argsort(-results["alignment"], axis=-1)]
    return results


def _bar(todo: list[Span], done_before: int, chunk: int, group, progress: bool):
    """The progress bar over ``todo``, the units (or parts of units) left to compute."""
    from tqdm import tqdm

    who = f"process {group.index} of {group.count}: " if group.count > 1 else ""
    done = f", {done_before} done before" if done_before else ""
    desc = f"sweep ({who}{len(todo)} units of {chunk} labels{done})"
    return tqdm(todo, desc=desc, unit="unit", disable=not progress)


def _start(store: SweepStore, make_plan, group, timeout: float) -> int | None:
    """Check the directory and agree on the chunk (None: the sweep is complete).

    One process: the checks raise as they are. Several: every process checks and writes a probe
    file, the processes exchange their fingerprints, chunks and probes through the runtime, and
    all of them stop with the same one-line error if any check failed anywhere."""
    if group.count == 1:
        store.check()
        return None if store.complete else make_plan().chunk
    token = secrets.token_hex(8)
    mine: dict = dict(fingerprint=store.fingerprint, token=token, error="")
    try:
        store.check()
        mine["complete"] = store.complete
        mine["chunk"] = None if mine["complete"] else make_plan().chunk
        store.write_probe(token)
    except (ValueError, OSError, RuntimeError) as e:
        mine["error"] = str(e)
    hello = [json.loads(v) for v in group.gather("hello", json.dumps(mine), timeout)]
    verdict = ""
    for j, h in enumerate(hello):
        if h["error"]:
            verdict = f"process {j} of {group.count}: {h['error']}"
            break
        if h["fingerprint"] != hello[0]["fingerprint"]:
            verdict = (
                f"process {j} runs a different sweep than process 0 (other images, labels, model or "
                "settings): give every process the same command"
            )
            break
        if j != group.index and store.read_probe(j) != h["token"]:
            verdict = (
                f"process {group.index} does not see the files process {j} writes in {str(store.out)!r}: the "
                "output directory must be one directory on a filesystem every process shares"
            )
            break
    verdicts = group.gather("verdict", verdict, timeout)
    store.remove_probe()
    first = next((v for v in verdicts if v), None)
    if first:
        raise ValueError(first)
    return None if hello[0]["complete"] else int(hello[0]["chunk"])


def _finish(store: SweepStore, group, labels: np.ndarray, failure: Exception | None):
    """After this process's units: wait for the others, let process 0 write the result, return it."""
    if group.count > 1:
        status = f"process {group.index} of {group.count}: {failure}" if failure is not None else ""
        if status:
            group.post_error(status)
        statuses = [json.loads(v) for v in group.gather("finished", json.dumps({"error": status}), None)]
        first = next((s["error"] for s in statuses if s.get("error")), None)
        if failure is None and first:
            failure = ValueError(first)
    if failure is not None:
        store.discard_if_empty()
        raise failure
    problem = ""
    if group.index == 0:
        try:
            store.assemble(labels)
        except ValueError as e:
            if group.count == 1:
                raise
            problem = str(e)
    if group.count > 1:
        problem = group.gather("assembled", problem, None)[0]
        if problem:
            raise ValueError(problem)
        if group.index > 0:
            (store.out / sweep_store.lock_name(group.index)).unlink(missing_ok=True)
    return store.results()


def read(out) -> dict[str, np.ndarray]:
    """The result arrays of a finished sweep directory ``out``, memory-mapped read-only."""
    out = Path(out)
    manifest = sweep_store.read_manifest(out / MANIFEST)
    if not manifest.get("complete"):
        raise ValueError(f"the sweep in {str(out)!r} is not finished: run it again to complete it")
    config = manifest["config"]
    n, t, num_labels = config["images"][0], len(config["temperatures"]), len(config["labels"])
    shapes = core.result_shapes(config["reduce"], n, t, num_labels, config["images"][1:])
    return SweepStore(out, manifest["fingerprint"], config, shapes).results()
