"""The pure part of a sweep: the unit kernel, how units cover the labels, and the memory plan.

A sweep computes a grid of images x temperatures x labels. A *unit* is one jitted call of
:func:`unit`: one image, one rule set, and a chunk of labels padded to a fixed size (one compiled
function for every unit; temperatures are traced). Units are defined by what they cover, a
:class:`Span` of label positions, never by an index: whatever the chunk (which depends on the
device count and the memory budget), the positions a finished unit covered stay covered.

The chunk comes from a bound on the device memory one label needs, read from the shapes of the
forward pass's residuals (:func:`footprint`: ``jax.eval_shape`` of ``jax.vjp``, no compile), and
on accelerators also from XLA's memory analysis of the compiled unit (:func:`compiled_footprint`).
Nothing here reads or writes files (``jaxpull.files.sweep_store`` does).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxpull.core.model import Model
from jaxpull.core.pullback import ascent_core, pullback_core
from jaxpull.core.rules import Rules
from jaxpull.core.settings import Ascent

METHODS = ("pullback", "ascent")
REDUCTIONS = ("maps", "norms", "alignment")
# A cotangent of the backward pass, the gradient it accumulates into and one elementwise temporary:
# the memory a further label of a pullback chunk needs at the widest layer (see ``footprint``).
COTANGENT_COPIES = 3


@functools.partial(jax.jit, static_argnames=("method", "reduce"))
def unit(
    model: Model, x: jax.Array, labels: jax.Array, rules: Rules, ascent: Ascent, *, method: str, reduce: str
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


def result_shapes(reduce: str, n: int, t: int, num_labels: int, image_shape: Sequence[int]) -> dict:
    """The arrays a sweep returns: ``{"maps": (N, T, L, H, W, 3)}`` or ``{reduce: (N, T, L)}``."""
    if reduce == "maps":
        return {"maps": (n, t, num_labels) + tuple(image_shape)}
    return {reduce: (n, t, num_labels)}


# --------------------------------------------------------------------------------------
# Units: spans of label positions
# --------------------------------------------------------------------------------------


class Span(NamedTuple):
    """Label positions ``[start, stop)`` of image ``image`` under temperature ``temp`` (indices into
    the sweep's images, temperatures and labels): what one unit covers."""

    image: int
    temp: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def chunks(n: int, t: int, num_labels: int, chunk: int) -> list[Span]:
    """The grid cut into units of ``chunk`` labels, in order: image, temperature, labels."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return [
        Span(i, k, a, min(a + chunk, num_labels))
        for i in range(n)
        for k in range(t)
        for a in range(0, num_labels, chunk)
    ]


def share(units: Sequence[Span], index: int, count: int) -> list[Span]:
    """Process ``index``'s units out of ``count``: a contiguous block, as even as the units allow.

    Depends only on the units (hence on the chunk), never on what is done, so processes that
    read the output directory at different moments still split the grid the same way."""
    if not 0 <= index < count:
        raise ValueError(f"process index {index} is out of range for {count} processes")
    lo, hi = len(units) * index // count, len(units) * (index + 1) // count
    return list(units[lo:hi])


def missing(span: Span, done: Iterable[Span]) -> list[Span]:
    """The parts of ``span`` no span of ``done`` covers (done spans of other rows are ignored)."""
    covered = np.zeros(span.size, bool)
    for d in done:
        if (d.image, d.temp) == (span.image, span.temp) and d.start < span.stop and d.stop > span.start:
            covered[max(d.start, span.start) - span.start : min(d.stop, span.stop) - span.start] = True
    out, start = [], None
    for p, c in enumerate(list(covered) + [True]):
        if not c and start is None:
            start = p
        elif c and start is not None:
            out.append(Span(span.image, span.temp, span.start + start, span.start + p))
            start = None
    return out


def gaps(n: int, t: int, num_labels: int, done: Iterable[Span]) -> list[Span]:
    """The label positions of the whole grid that ``done`` leaves uncovered (empty: complete)."""
    done = list(done)
    return [g for i in range(n) for k in range(t) for g in missing(Span(i, k, 0, num_labels), done)]


def padded_labels(labels: np.ndarray, span: Span, width: int) -> np.ndarray:
    """``(1, width)`` int32: the labels of ``span``, padded with its first label (its results dropped)."""
    take = labels[span.start : span.stop]
    return np.concatenate([take, np.full(width - len(take), take[0], take.dtype)])[None].astype(np.int32)


# --------------------------------------------------------------------------------------
# Placement over local devices
# --------------------------------------------------------------------------------------


def mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis mesh ``("labels",)`` over ``devices`` (default: this process's local devices)."""
    devices = list(devices) if devices is not None else jax.local_devices()
    return Mesh(np.array(devices), ("labels",))


def place(model: Model, x1, labels, rules: Rules, ascent: Ascent, m: Mesh):
    """One unit's arguments on mesh ``m``: labels sharded over it, everything else replicated.
    Returns ``(model, x1, labels, rules, ascent)`` in :func:`unit`'s order."""
    rep = NamedSharding(m, PartitionSpec())
    labels = jax.device_put(jnp.asarray(labels, jnp.int32), NamedSharding(m, PartitionSpec(None, "labels")))
    model, x1, rules, ascent = jax.device_put((model, jnp.asarray(x1), rules, ascent), rep)
    return model, x1, labels, rules, ascent


# --------------------------------------------------------------------------------------
# Memory plan
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Footprint:
    """Device memory of a unit on one device: ``base_bytes + labels_on_the_device * per_label_bytes``."""

    base_bytes: int
    per_label_bytes: int


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a sweep is cut into units: ``chunk`` labels per unit (a multiple of ``devices``)."""

    chunk: int
    per_label_bytes: int  # device memory each further label on a device needs (0: chunk given)
    base_bytes: int  # device memory of a unit on a device apart from that
    devices: int

    @property
    def unit_bytes(self) -> int:
        """The bound on one device's memory during a unit."""
        return self.base_bytes + self.chunk // self.devices * self.per_label_bytes


def _nbytes(s) -> int:
    return int(np.prod(s.shape, dtype=np.int64)) * np.dtype(s.dtype).itemsize


def residuals(model: Model, image_shape: Sequence[int], batch: int, rules: Rules) -> list[jax.ShapeDtypeStruct]:
    """The shapes of what a backward pass keeps from the forward pass of ``batch`` images: the
    residuals of ``jax.vjp`` of the forward under ``rules``, from ``jax.eval_shape`` (no compile;
    parameters the backward reads, e.g. convolution kernels, are among them)."""
    x = jax.ShapeDtypeStruct((batch,) + tuple(image_shape), jnp.float32)

    def vjp_function(params, x):
        return jax.vjp(lambda x: Model(params, model.spec).apply(x, rules), x)[1]

    return jax.tree_util.tree_leaves(jax.eval_shape(vjp_function, model.params, x))


def footprint(model: Model, image_shape: Sequence[int], method: str, rules: Rules) -> Footprint:
    """A bound on one unit's device memory from the forward pass's residuals (about a second).

    The residuals at batch 1 and 2 separate those that grow with the batch (per image: what a
    backward pass keeps of the activations) from those that do not (parameters). A pullback shares
    one forward among its labels (base: parameters, residuals, images) and each label adds
    :data:`COTANGENT_COPIES` copies of the largest per-image residual (its cotangent at the widest
    layer); an ascent label runs its own forward and backward (per label: the per-image residuals
    plus those copies). ``benchmarks/sweep_memory.py`` measures the bound against the process's
    peak memory.
    """
    one, two = residuals(model, image_shape, 1, rules), residuals(model, image_shape, 2, rules)
    params = sum(_nbytes(p) for p in jax.tree_util.tree_leaves(model.params))
    if len(one) == len(two):
        grows = [a for a, b in zip(one, two, strict=True) if _nbytes(b) == 2 * _nbytes(a) and _nbytes(a) > 0]
    else:  # the structure changed with the batch (it does not for the families here): count all
        grows = [a for a in one if a.shape and a.shape[0] == 1]
    per_image = sum(_nbytes(a) for a in grows)
    largest = max([_nbytes(a) for a in grows] + [_nbytes(jax.ShapeDtypeStruct(tuple(image_shape), jnp.float32))])
    image = int(np.prod(image_shape)) * 4
    per_label = COTANGENT_COPIES * largest + (per_image if method == "ascent" else 0)
    return Footprint(base_bytes=params + per_image + 2 * image, per_label_bytes=per_label)


def compiled_footprint(
    model: Model, image_shape: Sequence[int], method: str, reduce: str, rules: Rules, ascent: Ascent, m: Mesh
) -> Footprint:
    """XLA's own memory analysis of the compiled unit at 2 and 6 labels per device (two compiles),
    as a line: per device, temporaries and outputs, plus the parameters."""
    n_dev = m.devices.size
    params = sum(_nbytes(p) for p in jax.tree_util.tree_leaves(model.params))

    def device_bytes(c: int) -> int:
        x1 = np.zeros((1,) + tuple(image_shape), np.float32)
        args = place(model, x1, np.zeros((1, c), np.int32), rules, ascent, m)
        stats = unit.lower(*args, method=method, reduce=reduce).compile().memory_analysis()
        return 0 if stats is None else int(stats.temp_size_in_bytes + stats.output_size_in_bytes) // n_dev

    small, large = device_bytes(2 * n_dev), device_bytes(6 * n_dev)
    per_label = max(large - small, 0) // 4
    return Footprint(base_bytes=max(small - 2 * per_label, 0) + params, per_label_bytes=per_label)


def chunk_for_budget(budget: float, f: Footprint, devices: int, num_labels: int) -> int:
    """Labels per unit: as many per device as the budget holds, no more than the labels need, and
    a multiple of ``devices``.

    Raises:
      ValueError: if the budget does not hold one label per device.
    """
    per_device = int((budget - f.base_bytes) // max(f.per_label_bytes, 1))
    if per_device < 1:
        raise ValueError(
            f"memory budget {budget / 2**20:.0f} MiB is too small for one label "
            f"(needs about {(f.base_bytes + f.per_label_bytes) / 2**20:.0f} MiB per device): raise it"
        )
    return min(per_device, -(-num_labels // devices)) * devices


def chunk_for_size(chunk_size: int, devices: int, num_labels: int) -> int:
    """A given chunk size, capped by the labels there are and rounded up to a multiple of ``devices``
    (the padding is computed and dropped)."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a whole number >= 1, got {chunk_size!r}")
    return -(-min(int(chunk_size), num_labels) // devices) * devices


def plan(
    model: Model,
    image_shape: Sequence[int],
    method: str,
    reduce: str,
    rules: Rules,
    ascent: Ascent,
    *,
    memory_budget: float,
    chunk_size: int | None,
    num_labels: int,
    m: Mesh,
) -> Plan:
    """The chunk of a sweep: ``chunk_size`` if given (capped by ``num_labels``), else the most labels
    whose :func:`footprint` fits ``memory_budget`` bytes per device (on accelerators the larger of
    it and :func:`compiled_footprint`). Raises ValueError before any compute if nothing fits."""
    n_dev = m.devices.size
    if chunk_size is not None:
        return Plan(chunk_for_size(chunk_size, n_dev, num_labels), 0, 0, n_dev)
    f = footprint(model, image_shape, method, rules)
    if m.devices.flat[0].platform != "cpu":
        c = compiled_footprint(model, image_shape, method, reduce, rules, ascent, m)
        f = Footprint(max(f.base_bytes, c.base_bytes), max(f.per_label_bytes, c.per_label_bytes))
    return Plan(chunk_for_budget(memory_budget, f, n_dev, num_labels), f.per_label_bytes, f.base_bytes, n_dev)


def check_budget(memory_budget) -> float:
    """A memory budget in bytes: a finite positive number, else a one-line ValueError."""
    try:
        value = float(memory_budget)
    except (TypeError, ValueError):
        raise ValueError(f"memory budget must be a number of bytes, got {memory_budget!r}") from None
    if isinstance(memory_budget, bool) or not np.isfinite(value) or value <= 0:
        raise ValueError(f"memory budget must be a finite positive number of bytes (e.g. 2GB), got {memory_budget!r}")
    return value
