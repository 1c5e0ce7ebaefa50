"""Sweeps: images x labels x temperatures, in chunks that fit a memory budget, streamed to disk.

A sweep is a grid of work units, one per (image, temperature, chunk of labels). Each unit is
one jitted call (the label chunk is padded to a fixed size, so every unit reuses one compiled
function; temperatures are traced). The chunk size comes from XLA's own memory analysis of
that function at two sizes, so a 1000-label sweep of a 224x224 image never holds more than the
budget on the device, and with a reduction (``"norms"``, ``"alignment"``) never holds the maps
on the host either.

With ``out`` set, results go to ``.npy`` files that numpy can memory-map
(``np.load(path, mmap_mode="r")``) and a ``manifest.json`` that records the sweep's
configuration and the finished units; running the same sweep again resumes where it stopped,
and a different sweep in the same directory is refused before any compute.

With several local devices (GPUs, a TPU slice, or CPU devices forced with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``) the label axis of every chunk is sharded
across them (a one-axis ``Mesh`` and ``NamedSharding``). For several hosts, call
``jax.distributed.initialize()`` first and give each process its own ``images`` (or its own
``labels``) and its own ``out`` directory: units are independent, so no communication is needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxpull.core import checks
from jaxpull.core import settings
from jaxpull.core.pullback import ascent_core, pullback_core
from jaxpull.files.outputs import atomic_write
from jaxpull.core.model import Model

METHODS = ("pullback", "ascent")
REDUCTIONS = ("maps", "norms", "alignment")
MANIFEST = "manifest.json"
LOCK = ".lock"


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a sweep is cut into units."""

    chunk: int  # labels per unit
    per_label_bytes: int  # device memory each further label of a chunk needs (XLA's estimate)
    base_bytes: int  # device memory of a unit apart from that
    devices: int

    @property
    def unit_bytes(self) -> int:
        return self.base_bytes + self.chunk * self.per_label_bytes


@functools.partial(jax.jit, static_argnames=("method", "reduce"))
def unit(
    model: Model, x: jax.Array, labels: jax.Array, rules, ascent: settings.Ascent, *, method: str, reduce: str
) -> jax.Array:
    """One unit: ``x`` ``(1, H, W, 3)``, ``labels`` ``(1, C)`` -> maps ``(C, H, W, 3)`` or ``(C,)``.

    Pullbacks, or ascent differences x_K - x_0; reduced to L2 norms, or to the alignment
    ``<map, x> / (||map|| ||x||)`` (cosine between the explanation and the image).
    """
    if method == "pullback":
        maps = pullback_core(model, x, labels, rules)[0]
    else:
        maps = ascent_core(model, x, labels, rules, ascent)[0] - x[0]
    if reduce == "maps":
        return maps
    norms = jnp.sqrt(jnp.sum(maps**2, axis=(1, 2, 3)))
    if reduce == "norms":
        return norms
    return jnp.sum(maps * x, axis=(1, 2, 3)) / jnp.maximum(norms * jnp.linalg.norm(x), 1e-30)


def _mesh(devices: Optional[Sequence[jax.Device]]):
    devices = list(devices) if devices is not None else jax.local_devices()
    return Mesh(np.array(devices), ("labels",)), len(devices)


def _unit_args(model, x1, labels, rules, ascent, mesh):
    """Place one unit's arguments: labels sharded over the mesh, everything else replicated."""
    rep = NamedSharding(mesh, PartitionSpec())
    labels = jax.device_put(jnp.asarray(labels, jnp.int32), NamedSharding(mesh, PartitionSpec(None, "labels")))
    return jax.device_put((model, jnp.asarray(x1), rules, ascent), rep), labels


def plan(
    model: Model,
    image_shape,
    method: str = "pullback",
    reduce: str = "maps",
    *,
    memory_budget: float = 2 * 2**30,
    chunk_size: Optional[int] = None,
    num_labels: int = 1000,
    devices: Optional[Sequence[jax.Device]] = None,
    ascent: Optional[settings.Ascent] = None,
    rules: str = settings.DEFAULT_RULES,
) -> Plan:
    """Choose the labels per unit from a bound on the memory one label needs.

    The bound comes from the forward pass's jaxpr (no compile; about a second): a backward pass
    keeps the values the gradient needs, the outputs of convolutions, dense layers, gates and
    pools ("residuals"); XLA fuses the elementwise rest. A pullback shares one forward among
    the chunk's labels (base: the residuals) and each label adds its cotangents, bounded by 3x
    the largest value; an ascent label runs its own forward and backward (per label: the
    residuals plus 3x the largest value). Measured on EfficientNet-Lite0 224x224 (XLA:CPU,
    peak RSS growth between chunks of 4 and 32 labels, 2 and 10 for ascent): 10.6 MiB per
    pullback label (bound 14.0 MiB), 37.5 MiB per ascent label (bound 54.4 MiB). The previous
    bound, the sum of every jaxpr value (493 MiB per label), over-estimated 46x and compiled
    the unit twice (42 s). On accelerators, XLA's memory analysis of the compiled unit at 2
    and 6 labels per device is taken as well and the larger estimate wins.

    ``ascent`` (default: the preset ``rules``'s) and the preset's gates are those of the probe.

    Raises:
      ValueError: if the budget is too small for one label per device (before any compute).
    """
    mesh, n_dev = _mesh(devices)
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return Plan(chunk=-(-chunk_size // n_dev) * n_dev, per_label_bytes=0, base_bytes=0, devices=n_dev)
    ascent = settings.resolve_ascent(rules) if ascent is None else ascent
    rule_set = settings.resolve(rules)

    residuals, largest = forward_bytes(model, image_shape)
    per_label = 3 * largest + (residuals if method == "ascent" else 0)
    params = sum(int(p.size) * p.dtype.itemsize for p in jax.tree_util.tree_leaves(model.params))
    base = params + residuals + 2 * int(np.prod(image_shape)) * 4

    def temp_bytes(c: int) -> int:
        x1 = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
        args, labels = _unit_args(
            model, jnp.zeros(x1.shape, x1.dtype), np.zeros((1, c), np.int32), rule_set, ascent, mesh
        )
        compiled = unit.lower(args[0], args[1], labels, *args[2:], method=method, reduce=reduce).compile()
        stats = compiled.memory_analysis()
        return int(stats.temp_size_in_bytes + stats.output_size_in_bytes) if stats is not None else 0

    # XLA:CPU's analysis does not grow with the chunk (measured: 74.6 MB at 1 label, 73.5 MB at
    # 32, resnet18 64x64), so it is skipped there; elsewhere it is linear in the chunk: probe at
    # 2 and 6 labels per device (1 vs 2 under-reads buffer reuse).
    if mesh.devices.flat[0].platform != "cpu":
        small, large = temp_bytes(2 * n_dev), temp_bytes(6 * n_dev)
        per_label = max(per_label, max(large - small, 0) // (4 * n_dev))  # per device
        base = max(base, max(small - 2 * n_dev * per_label, 0) // n_dev + params)
    per_device = (memory_budget - base) // per_label
    if per_device < 1:
        raise ValueError(
            f"memory budget {memory_budget / 2**20:.0f} MiB is too small for one label "
            f"(needs about {(base + per_label) / 2**20:.0f} MiB per device): raise it"
        )
    chunk = int(min(per_device, -(-num_labels // n_dev))) * n_dev  # a multiple of the device count
    return Plan(chunk=chunk, per_label_bytes=per_label, base_bytes=base, devices=n_dev)


# Primitives whose outputs a backward pass keeps (the rest is elementwise work XLA fuses).
_RESIDUAL_PRIMITIVES = (
    "conv_general_dilated",
    "dot_general",
    "custom_vjp_call",
    "custom_vjp_call_jaxpr",
    "reduce_window_max",
    "reduce_window_sum",
    "reduce_window",
)


def forward_bytes(model: Model, image_shape) -> tuple:
    """``(residual bytes, largest value bytes)`` of one image's forward pass, from its jaxpr.

    Only values that depend on the image count (a kernel reshaped for a matmul is the same for
    every label). Residuals: the outputs of convolutions, dense layers, gates (custom VJPs) and
    pools, which a backward pass keeps; the largest value bounds one label's cotangent.
    """
    from jax.extend import core as jax_core

    from jaxpull.core.settings import VANILLA

    x = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda p, x: Model(p, model.spec).apply(x, VANILLA))(model.params, x)
    residuals, largest = 0, 0

    def walk(j, depends):
        """Walk ``j`` whose input variables ``depends`` (a list of bools) depend on the image."""
        nonlocal residuals, largest
        live = {v for v, d in zip(j.invars, depends) if d}
        for eqn in j.eqns:
            ins = [not isinstance(v, jax_core.Literal) and v in live for v in eqn.invars]
            if not any(ins):
                continue
            live.update(eqn.outvars)
            sizes = [
                int(np.prod(v.aval.shape, dtype=np.int64)) * v.aval.dtype.itemsize
                for v in eqn.outvars
                if hasattr(v.aval, "shape")
            ]
            largest = max([largest] + sizes)
            if eqn.primitive.name in _RESIDUAL_PRIMITIVES:
                residuals += sum(sizes)
            elif eqn.primitive.name in ("pjit", "jit", "closed_call", "remat"):
                inner = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
                if inner is not None:
                    walk(getattr(inner, "jaxpr", inner), ins)

    params = len(jax.tree_util.tree_leaves(model.params))
    walk(jaxpr.jaxpr, [False] * params + [True])
    return residuals, largest


def _fingerprint(model: Model, x: np.ndarray, config: dict) -> str:
    """Identity of a sweep: its configuration, the images, and a sample of the weights (first
    and last layers' leading bytes: enough to tell two conversions apart, cheap for big models)."""
    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True).encode())
    h.update(np.ascontiguousarray(x).tobytes())
    for leaf in jax.tree_util.tree_leaves(model.params)[:4] + jax.tree_util.tree_leaves(model.params)[-2:]:
        h.update(np.asarray(leaf).tobytes()[:4096])
    return h.hexdigest()


@contextlib.contextmanager
def output_lock(out: Path):
    """Hold an exclusive lock on the sweep directory ``out`` (made with its missing parents).

    ``fcntl.flock`` on ``out/.lock``: a second sweep into the same directory is refused with one
    line instead of computing everything twice; the lock goes with the process (also on kill -9).
    A directory this call created is removed again if the sweep fails before writing anything.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"sweep output {str(out)!r} is a file: give a directory")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle = open(out / LOCK, "a")
    except OSError as e:
        raise PermissionError(
            f"cannot create the sweep directory {str(out)!r} ({e.strerror}): choose another --out"
        ) from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(
                f"another sweep is writing to {str(out)!r}: wait for it to finish or choose another directory"
            ) from None
        try:
            yield out
        except BaseException:
            if created and [f.name for f in out.iterdir()] == [LOCK]:
                (out / LOCK).unlink()
                out.rmdir()
            raise
    finally:
        handle.close()  # releases the lock


def _exclusive(fn):
    """Run ``fn`` holding :func:`output_lock` on its ``out`` directory (if it has one)."""

    @functools.wraps(fn)
    def locked(*args, **kwargs):
        if kwargs.get("out") is None:
            return fn(*args, **kwargs)
        with output_lock(kwargs["out"]):
            return fn(*args, **kwargs)

    return locked


@_exclusive
def sweep(
    model: Model,
    x,
    labels: Sequence[int],
    temperatures: Optional[Sequence[Optional[float]]] = None,
    *,
    method: str = "pullback",
    reduce: str = "maps",
    out: Optional[os.PathLike] = None,
    memory_budget: float = 2 * 2**30,
    chunk_size: Optional[int] = None,
    rules=settings.DEFAULT_RULES,
    progress: bool = True,
    devices: Optional[Sequence[jax.Device]] = None,
    **overrides,
) -> Dict[str, np.ndarray]:
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
        refused); None keeps results in memory.
      memory_budget: bytes of device memory a unit may use (default 2 GiB); or ``chunk_size``.
    Returns:
      name -> array (``np.memmap`` when ``out`` is set): ``maps`` or ``norms`` / ``alignment``
      (+ ``top_labels``).
    """
    from tqdm import tqdm

    x = np.asarray(checks.images(x))
    checks.choice(method, METHODS, "method")
    checks.choice(reduce, REDUCTIONS, "reduce")
    labels = np.asarray(checks.targets(np.asarray(labels), 1, model.num_classes))[0]
    if "temperature" in overrides:
        raise ValueError("sweep takes temperatures (a list), not temperature: give temperatures=[...]")
    base, ascent = settings.resolve_both(rules, **overrides)
    temperatures = [base.relu.temperature] if temperatures is None else list(temperatures)
    if not temperatures:
        raise ValueError("temperatures is empty: give at least one (None for the exact gradient)")
    # a None temperature is the exact gradient (the CLI's --method vanilla): every rule plain
    rule_sets = [settings.VANILLA if t is None else base.replace(temperature=t) for t in temperatures]
    n, L, T = len(x), len(labels), len(temperatures)
    shapes = {"maps": (n, T, L) + x.shape[1:]} if reduce == "maps" else {reduce: (n, T, L)}

    config = dict(
        arch=model.arch,
        source=model.metadata.get("source", ""),
        images=list(x.shape),
        labels=labels.tolist(),
        temperatures=temperatures,
        method=method,
        reduce=reduce,
        rules=rules if isinstance(rules, str) else "custom",
        rule_settings=[r.settings() for r in rule_sets],
        ascent={n: s.get(ascent) for n, s in settings.ASCENT_SETTINGS.items()},
        format=3,
    )
    fingerprint = _fingerprint(model, x, config)
    done, manifest_path, recorded_chunk = set(), None, None
    if out is not None:
        out = Path(out)
        manifest_path = out / MANIFEST
        if manifest_path.is_file():
            manifest = _read_manifest(manifest_path)
            if manifest.get("fingerprint") != fingerprint:
                raise ValueError(f"{str(out)!r} holds a different sweep: choose another output directory or delete it")
            done, recorded_chunk = set(manifest["done"]), manifest["chunk"]
        elif out.exists() and any(f.name != LOCK for f in out.iterdir()):
            raise ValueError(f"{str(out)!r} is not empty and holds no sweep: choose an empty or new directory")

    p = plan(
        model,
        x.shape[1:],
        method,
        reduce,
        memory_budget=memory_budget,
        chunk_size=recorded_chunk or chunk_size,
        num_labels=L,
        devices=devices,
        ascent=ascent,
        rules=rules,
    )
    chunk = p.chunk
    n_chunks = -(-L // chunk)
    padded = np.concatenate([labels, np.full(n_chunks * chunk - L, labels[0], labels.dtype)])

    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if done:
            _check_results(out, shapes)
        results = {
            k: np.lib.format.open_memmap(out / f"{k}.npy", mode="r+" if done else "w+", dtype=np.float32, shape=s)
            for k, s in shapes.items()
        }
    else:
        results = {k: np.zeros(s, np.float32) for k, s in shapes.items()}

    def save_manifest():
        text = json.dumps(dict(fingerprint=fingerprint, config=config, chunk=chunk, done=sorted(done)), indent=1)
        atomic_write(manifest_path, lambda tmp: Path(tmp).write_text(text))

    if out is not None and not manifest_path.is_file():
        save_manifest()
    mesh, _ = _mesh(devices)
    units = [(i, k, c) for i in range(n) for k in range(T) for c in range(n_chunks)]
    todo = [u for u in units if _unit_id(u, T, n_chunks) not in done]
    bar = tqdm(todo, desc=f"sweep ({len(units)} units of {chunk} labels)", unit="unit", disable=not progress)
    for i, k, c in bar:
        args, lab = _unit_args(
            model, x[i : i + 1], padded[None, c * chunk : (c + 1) * chunk], rule_sets[k], ascent, mesh
        )
        value = np.asarray(unit(args[0], args[1], lab, *args[2:], method=method, reduce=reduce))
        take = min(chunk, L - c * chunk)
        results[next(iter(results))][i, k, c * chunk : c * chunk + take] = value[:take]
        if out is not None:
            for r in results.values():
                r.flush()
            done.add(_unit_id((i, k, c), T, n_chunks))
            save_manifest()
    if reduce == "alignment":
        results["top_labels"] = labels[np.argsort(-np.asarray(results["alignment"]), axis=-1)]
        if out is not None:  # saved beside the alignment (recomputed from it on every resume)
            top = np.ascontiguousarray(results["top_labels"], np.int32)
            atomic_write(out / "top_labels.npy", lambda tmp: _save_npy(tmp, top))
            results["top_labels"] = np.load(out / "top_labels.npy", mmap_mode="r")
    return results


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to the temporary name
        np.save(f, array)


def _read_manifest(path: Path) -> dict:
    """The manifest of a sweep directory; one-line ValueError if it is unreadable."""
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict) or not isinstance(manifest.get("done", []), list):
            raise ValueError("not a sweep manifest")
        return manifest
    except (ValueError, UnicodeDecodeError) as e:
        reason = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
        raise ValueError(
            f"{str(path)!r} is corrupt ({reason}): delete the directory {str(path.parent)!r} to run the sweep again"
        ) from None


def _check_results(out: Path, shapes: Dict[str, tuple]) -> None:
    """ValueError if a resumed sweep's result files are missing or of the wrong shape."""
    for k, shape in shapes.items():
        try:
            found = np.load(out / f"{k}.npy", mmap_mode="r").shape
        except (OSError, ValueError):
            found = None
        if found != tuple(shape):
            raise ValueError(
                f"{str(out / (k + '.npy'))!r} is missing or damaged: delete {str(out)!r} to run the sweep again"
            )


def _unit_id(u, T: int, n_chunks: int) -> int:
    i, k, c = u
    return (i * T + k) * n_chunks + c
