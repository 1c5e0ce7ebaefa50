"""A sweep's output directory: its lock, its manifests, one file per finished unit, and the result.

Layout of a directory ``D`` (one process or several, on a shared filesystem):

* ``D/.lock`` (process 0) and ``D/.lock.I`` (process I > 0): held with ``fcntl.flock`` while a
  process writes, so a second sweep (or a second process with the same id) is refused in one line;
* ``D/manifest.pI-of-N.json``: process I's manifest while the sweep runs: the sweep's identity
  (fingerprint and configuration), the chunk, and the units it finished;
* ``D/units/iIMAGE.tTEMP.lSTART-STOP.npy``: one finished unit, named by the label positions it
  covers, written atomically (a temporary file renamed into place): a unit is done exactly when
  its file exists, whoever wrote it and whatever the chunk was;
* when every label of every image and temperature is covered, the result files numpy can
  memory-map (``maps.npy`` or ``norms.npy`` / ``alignment.npy`` and ``top_labels.npy``) and the
  merged ``manifest.json``; the unit files and the per-process manifests are then removed, so the
  directory holds the same files, with the same bytes, however many processes computed it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from jaxpull.core.sweep import Span, gaps
from jaxpull.files.outputs import atomic_write

MANIFEST = "manifest.json"
LOCK = ".lock"
UNITS = "units"
FORMAT = 4  # of the manifest; 3: the unit-index manifests of jaxpull before units were named by their labels
RESULTS = ("maps.npy", "norms.npy", "alignment.npy", "top_labels.npy")
_UNIT = re.compile(r"i(\d+)\.t(\d+)\.l(\d+)-(\d+)\.npy")
_PROCESS_MANIFEST = re.compile(r"manifest\.p(\d+)-of-(\d+)\.json")
BOOKKEEPING = re.compile(r"\.lock(\.\d+)?|\.probe\.\d+|\..+\.part")  # locks, probes, temporary files: no output


def lock_name(index: int) -> str:
    """The lock file of process ``index`` (``.lock`` for process 0 and for one-process sweeps)."""
    return LOCK if index == 0 else f"{LOCK}.{index}"


def process_manifest_name(index: int, count: int) -> str:
    return f"manifest.p{index}-of-{count}.json"


def unit_name(span: Span) -> str:
    return f"i{span.image}.t{span.temp}.l{span.start}-{span.stop}.npy"


# --------------------------------------------------------------------------------------
# The lock
# --------------------------------------------------------------------------------------

_HELD: dict[Path, list] = {}  # lock file -> [handle, depth]: re-entrant within a process


@contextlib.contextmanager
def output_lock(out, index: int = 0, what: str = "sweep", flag: str = "--out") -> Iterator[Path]:
    """Hold process ``index``'s exclusive lock on the ``what`` directory ``out`` (made with its parents).

    ``fcntl.flock`` on ``out/.lock`` (``out/.lock.I`` for process I > 0): a second sweep into the
    directory, or a second process with the same id, is refused with one line instead of computing
    everything twice; the lock goes with the process (also on kill -9). Re-entrant within a
    process. A directory this call created is removed again if the sweep fails before anything but
    lock files was written. ``what`` (``"sweep"``, ``"evaluation"``) and ``flag`` name the run and
    its directory's flag in the messages.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{what} output {str(out)!r} is a file: give a directory ({flag})")
    path = out / lock_name(index)
    key = path.absolute()
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield out
        finally:
            _HELD[key][1] -= 1
        return
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a")
    except OSError as e:
        raise PermissionError(
            f"cannot create the {what} directory {str(out)!r} ({e.strerror}): choose another {flag}"
        ) from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if index == 0:
                raise RuntimeError(
                    f"another {what} is writing to {str(out)!r}: wait for it to finish or choose another {flag}"
                ) from None
            raise RuntimeError(
                f"another process with --process-id {index} is writing to {str(out)!r}: give each process its own "
                "--process-id (or wait for that one to finish)"
            ) from None
        _HELD[key] = [handle, 1]
        try:
            yield out
        except BaseException:
            if created:
                remove_if_only_locks(out, own=path)
            raise
        finally:
            del _HELD[key]
    finally:
        handle.close()  # releases the lock


def remove_if_only_locks(out: Path, own: Path | None = None) -> bool:
    """Remove the directory ``out`` if it holds nothing but lock and probe files and no other process
    holds one of the locks (``own``: the lock the caller holds); whether it did."""
    out = Path(out)
    try:
        names = [f.name for f in out.iterdir()]
        if any(not re.fullmatch(r"\.lock(\.\d+)?|\.probe\.\d+", n) for n in names):
            return False
        for n in names:
            if n.startswith(LOCK) and (own is None or out / n != Path(own)) and _held_elsewhere(out / n):
                return False  # another process works in the directory
        for n in names:
            (out / n).unlink(missing_ok=True)
        out.rmdir()
        return True
    except OSError:
        return False


def _held_elsewhere(path: Path) -> bool:
    """Whether another process holds the lock file ``path``."""
    try:
        with open(path, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
            return False
    except OSError:
        return False


# --------------------------------------------------------------------------------------
# Manifests and units
# --------------------------------------------------------------------------------------


def read_manifest(path: Path) -> dict:
    """A manifest of a sweep directory; one-line ValueError if it is unreadable."""
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict) or not isinstance(manifest.get("fingerprint", ""), str):
            raise ValueError("not a sweep manifest")
        return manifest
    except (ValueError, UnicodeDecodeError) as e:
        reason = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
        raise ValueError(
            f"{str(path)!r} is corrupt ({reason}): delete the directory {str(path.parent)!r} to run the sweep again"
        ) from None


def _write_json(path: Path, data: Mapping) -> None:
    text = json.dumps(data, indent=1)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to the temporary name
        np.save(f, array)


class SweepStore:
    """One process's access to a sweep directory (hold :func:`output_lock` while using it).

    ``fingerprint``: the sweep's identity; ``config``: its settings, recorded in the manifests;
    ``shapes``: the result arrays (``jaxpull.core.sweep.result_shapes``); ``index`` / ``count``:
    this process among the sweep's processes.
    """

    def __init__(
        self,
        out,
        fingerprint: str,
        config: Mapping,
        shapes: Mapping[str, tuple],
        index: int = 0,
        count: int = 1,
    ):
        self.out = Path(out)
        self.fingerprint = fingerprint
        self.config = dict(config)
        self.shapes = {k: tuple(v) for k, v in shapes.items()}
        self.index, self.count = index, count
        self.units = self.out / UNITS
        self.manifest_path = self.out / process_manifest_name(index, count)
        self.written: list[str] = []

    # ---- state ---------------------------------------------------------------------------

    def check(self) -> None:
        """ValueError unless the directory is empty, or holds this same sweep (any process count):
        every manifest in it must carry this sweep's fingerprint, and nothing else may be there."""
        manifests = [self.out / MANIFEST] if (self.out / MANIFEST).is_file() else []
        manifests += sorted(f for f in self.out.glob("manifest.p*.json") if _PROCESS_MANIFEST.fullmatch(f.name))
        for path in manifests:
            manifest = read_manifest(path)
            if manifest.get("format") != FORMAT:
                raise ValueError(
                    f"{str(self.out)!r} holds a sweep written by an older jaxpull (manifest format "
                    f"{manifest.get('format', 3)}): delete it or choose another output directory"
                )
            if manifest.get("fingerprint") != self.fingerprint:
                raise ValueError(
                    f"{str(self.out)!r} holds a different sweep: choose another output directory or delete it"
                )
        expected = {MANIFEST, UNITS, *RESULTS} | {p.name for p in manifests}
        foreign = [f.name for f in self.out.iterdir() if f.name not in expected and not BOOKKEEPING.fullmatch(f.name)]
        if foreign and not manifests:
            raise ValueError(f"{str(self.out)!r} is not empty and holds no sweep: choose an empty or new directory")
        if foreign:
            raise ValueError(
                f"{str(self.out)!r} holds files a sweep does not write ({', '.join(sorted(foreign)[:3])}): "
                "move them away or choose another directory"
            )

    @property
    def complete(self) -> bool:
        """Whether the result files and the merged manifest are written."""
        path = self.out / MANIFEST
        return path.is_file() and read_manifest(path).get("complete", False)

    def done(self) -> list[Span]:
        """The spans of the unit files in the directory (finished by any process, any chunk)."""
        if not self.units.is_dir():
            return []
        found = []
        for f in self.units.iterdir():
            match = _UNIT.fullmatch(f.name)
            if match:
                found.append(Span(*(int(g) for g in match.groups())))
        return sorted(found)

    # ---- writing -------------------------------------------------------------------------

    def begin(self, chunk: int) -> None:
        """Write this process's manifest (the sweep's identity and the chunk of this run)."""
        self.chunk = chunk
        self._save_manifest()

    def _save_manifest(self) -> None:
        _write_json(
            self.manifest_path,
            dict(
                format=FORMAT,
                fingerprint=self.fingerprint,
                config=self.config,
                process=dict(index=self.index, count=self.count),
                chunk=self.chunk,
                done=self.written,
            ),
        )

    def write_unit(self, span: Span, values: np.ndarray) -> None:
        """Save one finished unit's values (``(span.size, ...)``) atomically under its own name."""
        self.units.mkdir(exist_ok=True)
        name = unit_name(span)
        atomic_write(self.units / name, lambda tmp: _save_npy(tmp, np.ascontiguousarray(values, np.float32)))
        self.written.append(name)
        self._save_manifest()

    def discard_if_empty(self) -> None:
        """Remove this process's manifest if it finished no unit (a run that failed at its first unit
        leaves nothing that would pin its settings)."""
        if not self.written:
            self.manifest_path.unlink(missing_ok=True)
            if self.units.is_dir() and not any(self.units.iterdir()):
                self.units.rmdir()

    def assemble(self, labels: np.ndarray) -> None:
        """Write the result files and the merged manifest from the unit files, then remove those.

        ``labels`` ``(L,)``: the sweep's labels (``top_labels`` sorts them by alignment).
        Raises ValueError if a label is not covered (a unit file is missing) or a unit file is damaged.
        """
        (name, shape), *_ = self.shapes.items()
        n, t, num_labels = shape[:3]
        done = self.done()
        missing = gaps(n, t, num_labels, done)
        if missing:
            m = missing[0]
            raise ValueError(
                f"{str(self.units)!r} lacks {sum(s.size for s in missing)} results (first: image {m.image}, "
                f"temperature {m.temp}, labels {m.start}-{m.stop - 1}): run the sweep again to compute them"
            )
        target = self.out / f"{name}.npy"

        def write(tmp: str) -> None:
            result = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
            for span in done:
                path = self.units / unit_name(span)
                try:
                    values = np.load(path)
                except (OSError, ValueError):
                    values = None
                if values is None or values.shape != (span.size,) + tuple(shape[3:]):
                    raise ValueError(f"{str(path)!r} is damaged: delete it and run the sweep again")
                result[span.image, span.temp, span.start : span.stop] = values
            result.flush()
            del result

        atomic_write(target, write)
        if name == "alignment":
            alignment = np.load(target, mmap_mode="r")
            top = np.ascontiguousarray(labels[np.argsort(-np.asarray(alignment), axis=-1)], np.int32)
            atomic_write(self.out / "top_labels.npy", lambda tmp: _save_npy(tmp, top))
        processes = sorted(
            read_manifest(f).get("process", {}).get("count", 1)
            for f in self.out.glob("manifest.p*.json")
            if _PROCESS_MANIFEST.fullmatch(f.name)
        )
        _write_json(
            self.out / MANIFEST,
            dict(
                format=FORMAT,
                fingerprint=self.fingerprint,
                config=self.config,
                complete=True,
                units=len(done),
                process_counts=sorted(set(processes)),
            ),
        )
        for f in self.out.glob("manifest.p*.json"):
            if _PROCESS_MANIFEST.fullmatch(f.name):
                f.unlink(missing_ok=True)
        shutil.rmtree(self.units, ignore_errors=True)

    # ---- reading -------------------------------------------------------------------------

    def results(self) -> dict[str, np.ndarray]:
        """The finished sweep's arrays, memory-mapped read-only: name -> ``np.memmap``.

        Raises ValueError if a result file is missing or of the wrong shape."""
        arrays = {}
        for name, shape in self.shapes.items():
            arrays[name] = self._load(name, shape)
        if "alignment" in self.shapes:
            arrays["top_labels"] = self._load("top_labels", self.shapes["alignment"])
        return arrays

    def _load(self, name: str, shape: Sequence[int]) -> np.ndarray:
        path = self.out / f"{name}.npy"
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError):
            array = None
        if array is None or array.shape != tuple(shape):
            raise ValueError(f"{str(path)!r} is missing or damaged: delete {str(self.out)!r} to run the sweep again")
        return array

    # ---- a directory every process sees -------------------------------------------------

    def write_probe(self, token: str) -> None:
        """Leave ``token`` in ``.probe.I``: the other processes read it to check they share the directory."""
        (self.out / f".probe.{self.index}").write_text(token)

    def read_probe(self, index: int) -> str | None:
        try:
            return (self.out / f".probe.{index}").read_text()
        except OSError:
            return None

    def remove_probe(self) -> None:
        (self.out / f".probe.{self.index}").unlink(missing_ok=True)
