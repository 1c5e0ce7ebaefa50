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

import dataclasses
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

from jaxpull import checks
from jaxpull.explain import ascent_core, make_gating, pullback_core
from jaxpull.io import atomic_write
from jaxpull.model import Model

METHODS = ("pullback", "ascent")
REDUCTIONS = ("maps", "norms", "alignment")
MANIFEST = "manifest.json"


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


@functools.partial(jax.jit, static_argnames=("method", "reduce", "loss", "relative_alpha", "project", "clip"))
def unit(model: Model, x: jax.Array, labels: jax.Array, gating, steps, alpha, eps, margin, *,
         method: str, reduce: str, loss="logit", relative_alpha=False, project=True, clip=True) -> jax.Array:
    """One unit: ``x`` ``(1, H, W, 3)``, ``labels`` ``(1, C)`` -> maps ``(C, H, W, 3)`` or ``(C,)``.

    Pullbacks, or ascent differences x_K - x_0; reduced to L2 norms, or to the alignment
    ``<map, x> / (||map|| ||x||)`` (cosine between the explanation and the image).
    """
    if method == "pullback":
        maps = pullback_core(model, x, labels, gating, "shared")[0]
    else:
        maps = ascent_core(model, x, labels, gating, steps, alpha, eps, margin, loss=loss,
                           relative_alpha=relative_alpha, project=project, clip=clip)[0] - x[0]
    if reduce == "maps":
        return maps
    norms = jnp.sqrt(jnp.sum(maps**2, axis=(1, 2, 3)))
    if reduce == "norms":
        return norms
    return jnp.sum(maps * x, axis=(1, 2, 3)) / jnp.maximum(norms * jnp.linalg.norm(x), 1e-30)


def _mesh(devices: Optional[Sequence[jax.Device]]):
    devices = list(devices) if devices is not None else jax.local_devices()
    return Mesh(np.array(devices), ("labels",)), len(devices)


def _unit_args(model, x1, labels, gating, options, mesh):
    """Place one unit's arguments: labels sharded over the mesh, everything else replicated."""
    rep = NamedSharding(mesh, PartitionSpec())
    labels = jax.device_put(jnp.asarray(labels, jnp.int32), NamedSharding(mesh, PartitionSpec(None, "labels")))
    dyn = [jnp.asarray(v, d) for v, d in ((options["steps"], jnp.int32), (options["alpha"], jnp.float32),
                                          (options["eps"], jnp.float32), (options["margin"], jnp.float32))]
    return jax.device_put((model, jnp.asarray(x1), gating, *dyn), rep), labels


def plan(model: Model, image_shape, method: str = "pullback", reduce: str = "maps", *,
         memory_budget: float = 2 * 2**30, chunk_size: Optional[int] = None, num_labels: int = 1000,
         devices: Optional[Sequence[jax.Device]] = None, options: Optional[dict] = None) -> Plan:
    """Choose the labels per unit from XLA's memory analysis of the unit at 2 and 6 labels per device.

    Raises:
      ValueError: if the budget is too small for one label per device (before any compute).
    """
    mesh, n_dev = _mesh(devices)
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return Plan(chunk=-(-chunk_size // n_dev) * n_dev, per_label_bytes=0, base_bytes=0, devices=n_dev)
    options = _ascent_options(options or {})
    gating = make_gating(0.3, None)
    static = options["static"]

    def temp_bytes(c: int) -> int:
        x1 = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
        args, labels = _unit_args(model, jnp.zeros(x1.shape, x1.dtype), np.zeros((1, c), np.int32), gating, options, mesh)
        compiled = unit.lower(args[0], args[1], labels, *args[2:], method=method, reduce=reduce, **static).compile()
        stats = compiled.memory_analysis()
        return int(stats.temp_size_in_bytes + stats.output_size_in_bytes) if stats is not None else 0

    # Linear in the chunk: probe at 2 and 6 labels per device (1 vs 2 under-reads buffer reuse).
    small, large = temp_bytes(2 * n_dev), temp_bytes(6 * n_dev)
    per_label = max(large - small, 0) // (4 * n_dev)  # per device
    # XLA:CPU's analysis does not grow with the chunk (measured: 74.6 MB at 1 label, 73.5 MB at
    # 32, resnet18 64x64); there, bound a label by the sum of the forward's activation sizes
    # (what one backward pass can keep live), twice that for ascent (its own forward too).
    bound = activation_bytes(model, image_shape) * (2 if method == "ascent" else 1)
    per_label = max(per_label, bound)
    params = sum(int(p.size) * p.dtype.itemsize for p in jax.tree_util.tree_leaves(model.params))
    base = max(small - 2 * n_dev * per_label, 0) // n_dev + params
    per_device = (memory_budget - base) // per_label
    if per_device < 1:
        raise ValueError(
            f"memory budget {memory_budget / 2**20:.0f} MiB is too small for one label "
            f"(needs about {(base + per_label) / 2**20:.0f} MiB per device): raise it"
        )
    chunk = int(min(per_device, -(-num_labels // n_dev))) * n_dev  # a multiple of the device count
    return Plan(chunk=chunk, per_label_bytes=per_label, base_bytes=base, devices=n_dev)


def activation_bytes(model: Model, image_shape) -> int:
    """Sum of the sizes of every intermediate value of one image's forward pass, in bytes."""
    from jaxpull.gates import VANILLA

    x = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda x: model.apply(x, VANILLA))(x)
    return int(sum(np.prod(v.aval.shape, dtype=np.int64) * v.aval.dtype.itemsize
                   for eqn in jaxpr.eqns for v in eqn.outvars if hasattr(v.aval, "shape")))


def _ascent_options(options: dict) -> dict:
    o = dict(steps=5, alpha=20.0, eps=100.0, margin=0.0, loss="logit", relative_alpha=False, clip=True)
    unknown = set(options) - set(o)
    if unknown:
        raise ValueError(f"unknown ascent option(s) {', '.join(sorted(unknown))}: use {', '.join(o)}")
    o.update(options)
    checks.choice(o["loss"], ("logit", "cross_entropy", "self_explain"), "loss")
    static = dict(loss=o["loss"], relative_alpha=bool(o["relative_alpha"]), project=o["eps"] is not None,
                  clip=bool(o["clip"]))
    return dict(steps=o["steps"], alpha=o["alpha"], eps=1.0 if o["eps"] is None else o["eps"],
                margin=o["margin"], static=static, given=o)


def _fingerprint(model: Model, x: np.ndarray, config: dict) -> str:
    """Identity of a sweep: its configuration, the images, and a sample of the weights (first
    and last layers' leading bytes: enough to tell two conversions apart, cheap for big models)."""
    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True).encode())
    h.update(np.ascontiguousarray(x).tobytes())
    for leaf in jax.tree_util.tree_leaves(model.params)[:4] + jax.tree_util.tree_leaves(model.params)[-2:]:
        h.update(np.asarray(leaf).tobytes()[:4096])
    return h.hexdigest()


def sweep(
    model: Model,
    x,
    labels: Sequence[int],
    temperatures: Sequence[Optional[float]] = (0.3,),
    *,
    method: str = "pullback",
    reduce: str = "maps",
    out: Optional[os.PathLike] = None,
    memory_budget: float = 2 * 2**30,
    chunk_size: Optional[int] = None,
    gate: str = "sigmoid",
    pool_weights: str = "soft",
    progress: bool = True,
    devices: Optional[Sequence[jax.Device]] = None,
    **ascent_options,
) -> Dict[str, np.ndarray]:
    """Run ``method`` for every image x temperature x label, in memory-bounded chunks.

    Args:
      model: a converted model.
      x: images ``(N, H, W, 3)`` in [-1, 1].
      labels: the L class indices to explain (e.g. ``range(1000)``).
      temperatures: the T temperatures (``None`` for the vanilla gradient).
      method: ``"pullback"`` or ``"ascent"`` (then ``ascent_options``: steps, alpha, eps, ...).
      reduce: ``"maps"`` keeps every map ``(N, T, L, H, W, 3)``; ``"norms"`` keeps ``(N, T, L)``
        L2 norms; ``"alignment"`` keeps ``(N, T, L)`` cosines between map and image, and
        ``top_labels`` ``(N, T, L)``, the labels sorted by alignment.
      out: a directory for memory-mappable ``.npy`` results and the resumable manifest; None
        keeps results in memory.
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
    temperatures = list(temperatures)
    if not temperatures:
        raise ValueError("temperatures is empty: give at least one (None for vanilla)")
    gatings = [make_gating(t, None, gate, pool_weights) for t in temperatures]
    options = _ascent_options(ascent_options)
    n, L, T = len(x), len(labels), len(temperatures)
    shapes = {"maps": (n, T, L) + x.shape[1:]} if reduce == "maps" else {reduce: (n, T, L)}

    config = dict(arch=model.arch, source=model.metadata.get("source", ""), images=list(x.shape),
                  labels=labels.tolist(), temperatures=temperatures, method=method, reduce=reduce, gate=gate,
                  pool_weights=pool_weights, options={k: v for k, v in options["given"].items()}, format=1)
    fingerprint = _fingerprint(model, x, config)
    done, manifest_path, recorded_chunk = set(), None, None
    if out is not None:
        out = Path(out)
        manifest_path = out / MANIFEST
        if manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("fingerprint") != fingerprint:
                raise ValueError(f"{str(out)!r} holds a different sweep: choose another output directory or delete it")
            done, recorded_chunk = set(manifest["done"]), manifest["chunk"]
        elif out.exists() and any(out.iterdir()):
            raise ValueError(f"{str(out)!r} is not empty and holds no sweep: choose an empty or new directory")
        if out.parent and not out.parent.is_dir():
            raise FileNotFoundError(f"output directory {str(out.parent)!r} does not exist: create it first")

    p = plan(model, x.shape[1:], method, reduce, memory_budget=memory_budget,
             chunk_size=recorded_chunk or chunk_size, num_labels=L, devices=devices, options=ascent_options)
    chunk = p.chunk
    n_chunks = -(-L // chunk)
    padded = np.concatenate([labels, np.full(n_chunks * chunk - L, labels[0], labels.dtype)])

    if out is not None:
        out.mkdir(exist_ok=True)
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
        args, lab = _unit_args(model, x[i : i + 1], padded[None, c * chunk : (c + 1) * chunk], gatings[k], options, mesh)
        value = np.asarray(unit(args[0], args[1], lab, *args[2:], method=method, reduce=reduce, **options["static"]))
        take = min(chunk, L - c * chunk)
        results[next(iter(results))][i, k, c * chunk : c * chunk + take] = value[:take]
        if out is not None:
            for r in results.values():
                r.flush()
            done.add(_unit_id((i, k, c), T, n_chunks))
            save_manifest()
    if reduce == "alignment":
        results["top_labels"] = labels[np.argsort(-np.asarray(results["alignment"]), axis=-1)]
    return results


def _unit_id(u, T: int, n_chunks: int) -> int:
    i, k, c = u
    return (i * T + k) * n_chunks + c
