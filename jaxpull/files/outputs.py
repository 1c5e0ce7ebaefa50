"""Output files written safely: one check before any compute, and writes that leave no partial file.

Every writer (CLI commands, conversion, sweeps, the app) checks its output path with
:func:`check_output` before working, and writes through :func:`atomic_write`: a temporary file in
the same directory, renamed into place, so an interrupted write never leaves a half-written file.
"""

from __future__ import annotations

import glob
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

PathLike = str | os.PathLike


def check_output(path: PathLike, suffix: str | None = None, what: str = "output") -> Path:
    """Fail before any compute if ``path`` cannot be written; return it as a Path.

    One check for every writer (CLI commands, conversion, the app): the suffix, an existing
    directory of that name, and a parent directory that is missing, not a directory, or not
    writable each get a one-line error that names the path.
    """
    out = Path(path)
    if suffix is not None and out.suffix.lower() != suffix:
        raise ValueError(f"{what} {str(path)!r} must end in {suffix}")
    if out.is_dir():
        raise IsADirectoryError(
            f"{what} {str(path)!r} is a directory: give a file name such as {str(out / ('out' + (suffix or '')))!r}"
        )
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        if parent.exists():
            raise NotADirectoryError(
                f"{what} directory {str(parent)!r} is a file, not a directory: choose another path"
            )
        raise FileNotFoundError(f"{what} directory {str(parent)!r} does not exist: create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} directory {str(parent)!r} is not writable: choose another path")
    return out


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def remove_stale_temps(path: PathLike) -> list:
    """Delete the temporary files of earlier writes of ``path`` whose process is gone (a ``kill -9``
    during a write leaves one); return their names. Temporary names carry the writer's pid."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    # .NAME.PID-XXXXXXXX.part (mkstemp's 8 random characters), or .NAME.XXXXXXXX.part from before pids
    pattern = re.compile(re.escape(_temp_prefix(path)) + r"(?:(\d+)-)?[a-z0-9_]{8}\.part")
    removed = []
    for f in directory.glob(glob.escape(_temp_prefix(path)) + "*.part"):
        match = pattern.fullmatch(f.name)
        if match is None:
            continue  # another target's (e.g. NAME.bak's)
        if match.group(1) and _alive(int(match.group(1))):
            continue  # another process (or thread of this one) is writing it now
        try:
            f.unlink()
            removed.append(f.name)
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    """The process umask, read without changing it where Linux reports it (os.umask is not thread-safe)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def atomic_write(path: PathLike, write) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path`` (same directory).

    The temporary file ``.NAME.PID-XXXX.part`` gets the usual permissions (0666 less the umask)
    before the rename; temporary files of ``path`` left by killed processes are removed first.
    """
    path = check_output(path)
    directory = path.parent if str(path.parent) else Path(".")
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f"{_temp_prefix(path)}{os.getpid()}-", suffix=".part", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_arrays(path: PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` to the ``.npz`` file ``path`` atomically (nothing half-written is left)."""

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to the temporary name
            np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stubs: a key could be allow_pickle (a bool)

    atomic_write(path, write)
