"""Several processes on JAX's distributed runtime: joining it, talking through it, and one-line errors.

A sweep under ``jax.distributed`` splits its units among the processes by ``jax.process_index()``
and ``jax.process_count()`` (``jaxpull.core.sweep.share``), and so does an evaluation
(``jaxpull.evaluation.runner.run``); the processes only talk through the runtime's key-value store
(:class:`Group`): at the start to check that they run the same work into the same directory, and
at the end to wait for each other before process 0 writes the result.

JAX's runtime stops a process it finds in trouble with a C++ fatal error (a page of log and a
stack trace, no Python exception): a coordinator that cannot be reached, a process that stopped
sending heartbeats, a second process with an id already in use. So the command line runs a
distributed sweep or evaluation in a child process (:func:`supervise`), passes its output
through, and turns the runtime's fatal error into one line naming the cause. Every wait is
bounded: joining, the checks at the start, and the heartbeats that tell a dead process, by
``timeout`` seconds (:data:`DEFAULT_TIMEOUT`); waiting for the other processes to finish their
units is not (they may compute for hours) but a process that dies is found by the heartbeats
within ``timeout``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

DEFAULT_TIMEOUT = 120  # seconds: joining, the start-up checks, and the heartbeats
WORKER_ENV = "JAXPULL_DISTRIBUTED_WORKER"


@dataclasses.dataclass(frozen=True)
class Settings:
    """How this process joins: ``coordinator`` ``HOST:PORT``, ``num_processes``, ``process_id``
    (all None: what ``jax.distributed.initialize()`` detects, e.g. under SLURM), ``timeout`` seconds."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    timeout: float = DEFAULT_TIMEOUT

    def __post_init__(self):
        given = [v is not None for v in (self.coordinator, self.num_processes, self.process_id)]
        if any(given) and not all(given):
            raise ValueError(
                "--coordinator, --num-processes and --process-id go together: give all three "
                "(or none, where jax.distributed.initialize() detects them, e.g. under SLURM)"
            )
        if not (isinstance(self.timeout, (int, float)) and 1 <= self.timeout <= 86400):
            raise ValueError(f"--distributed-timeout must be between 1 and 86400 seconds, got {self.timeout!r}")
        if self.explicit:
            host, port = split_address(self.coordinator)
            n, i = self.num_processes, self.process_id
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"--num-processes must be a whole number >= 1, got {n!r}")
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
                raise ValueError(f"--process-id {i!r} is out of range: with --num-processes {n} use 0 to {n - 1}")

    @property
    def explicit(self) -> bool:
        return self.coordinator is not None


def split_address(address: str):
    """``"HOST:PORT"`` -> ``(host, port)``; a one-line ValueError for anything else."""
    host, sep, port = str(address).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--coordinator {address!r} is not HOST:PORT (e.g. 10.0.0.1:1234, a free port on process 0)")
    return host, int(port)


def cluster_detected() -> bool:
    """Whether ``jax.distributed.initialize()`` would find a cluster (SLURM, Open MPI, Cloud TPU, ...)
    by itself. Reads JAX's own list of cluster environments; False where JAX does not expose it."""
    import warnings

    try:
        from jax._src.clusters import ClusterEnv
    except ImportError:
        return False
    with warnings.catch_warnings():  # e.g. Kubernetes without its client package: a warning, no cluster
        warnings.simplefilter("ignore")
        return any(not env.opt_in_only_method and env.is_env_present() for env in ClusterEnv._cluster_types)


def initialize(settings: Settings = Settings()) -> None:
    """Join JAX's distributed runtime (the Python equivalent of the command line's flags): a
    ``jax.distributed.initialize`` whose joining, heartbeats and shutdown wait ``settings.timeout``
    seconds at most. Call it before any other JAX call. The settings are checked first (one-line
    ValueError); what the runtime finds wrong later stops the process (see :func:`supervise`)."""
    import jax

    t = int(settings.timeout)
    kwargs = dict(initialization_timeout=t, heartbeat_timeout_seconds=t, shutdown_timeout_seconds=t)
    if settings.explicit:
        jax.distributed.initialize(settings.coordinator, settings.num_processes, settings.process_id, **kwargs)
    else:
        jax.distributed.initialize(**kwargs)


# --------------------------------------------------------------------------------------
# Talking through the runtime
# --------------------------------------------------------------------------------------


class Group:
    """This process among the processes of one sweep or evaluation; ``gather`` is the only exchange.

    One process (no runtime): ``index`` 0 of ``count`` 1, and every exchange returns its own value.
    ``timeout``: the seconds the start-up checks wait for the other processes.
    """

    index = 0
    count = 1
    timeout: float = DEFAULT_TIMEOUT

    def gather(self, stage: str, value: str, timeout: float | None) -> list[str]:
        """Every process's ``value`` for ``stage``, in process order (waits for all)."""
        return [value]

    def post_error(self, message: str) -> None:
        """Tell the other processes this one stopped (they stop after their current unit)."""

    def error(self) -> str | None:
        """A message another process posted with :meth:`post_error`, if any."""
        return None


class RuntimeGroup(Group):
    """The processes of ``jax.distributed``: values travel through its key-value store (the client
    JAX keeps in ``jax._src.distributed.global_state``; jax 0.10 has no public handle on it)."""

    _calls = 0  # groups so far in this process: every process counts the same, so keys never clash

    def __init__(self, timeout: float = DEFAULT_TIMEOUT, what: str = "sweep"):
        import jax
        from jax._src import distributed as runtime

        self.client = runtime.global_state.client
        if self.client is None:
            raise RuntimeError("jax.distributed is not initialized: call jaxpull.shell.distributed.initialize() first")
        self.index, self.count = jax.process_index(), jax.process_count()
        self.timeout, self.what = timeout, what
        RuntimeGroup._calls += 1
        self.prefix = f"jaxpull/{what}{RuntimeGroup._calls}"

    def gather(self, stage: str, value: str, timeout: float | None) -> list[str]:
        from jax.errors import JaxRuntimeError

        self.client.key_value_set(f"{self.prefix}/{stage}/{self.index}", value)
        values = []
        for j in range(self.count):
            key, start = f"{self.prefix}/{stage}/{j}", time.monotonic()
            while True:
                wait = 5.0 if timeout is None else max(min(5.0, timeout - (time.monotonic() - start)), 0.001)
                try:
                    values.append(self.client.blocking_key_value_get(key, int(wait * 1000)))
                    break
                except JaxRuntimeError:
                    if timeout is not None and time.monotonic() - start >= timeout:
                        raise TimeoutError(
                            f"process {j} of {self.count} did not reach the {self.what}'s {stage} step within "
                            f"{timeout:g} s: did it stop with an error (see its output)? Run the same command in "
                            "every process"
                        ) from None
                    if timeout is None and self.error() is not None:
                        values.append(json.dumps({"error": self.error()}))
                        break
        return values

    def post_error(self, message: str) -> None:
        try:
            self.client.key_value_set(f"{self.prefix}/error", message)
        except Exception:  # another process posted first
            pass

    def error(self) -> str | None:
        from jax.errors import JaxRuntimeError

        try:
            return self.client.key_value_try_get(f"{self.prefix}/error")
        except JaxRuntimeError:
            return None


def current(timeout: float = DEFAULT_TIMEOUT, what: str = "sweep") -> Group:
    """The processes of a ``what`` (``"sweep"``, ``"evaluation"``) started now: :class:`RuntimeGroup`
    under ``jax.distributed`` with more than one process, else the one-process :class:`Group`."""
    import jax

    if jax.process_count() > 1:
        return RuntimeGroup(timeout, what)
    return Group()


# --------------------------------------------------------------------------------------
# The command line: a child process per sweep, the runtime's fatal errors as one line
# --------------------------------------------------------------------------------------

# jaxpull's own lines on stderr: its messages, its progress bars, Python's warnings and tracebacks
_OURS = re.compile(r"^(jaxpull: |sweep \(|\S+:\d+: \w*Warning: |Traceback |  File |\w+Error: )")
_GLOG = re.compile(r"^[IWEF]\d{4} [\d:.]+\s+\d+ \S+:\d+\]")  # absl / glog: I1204 15:19:16.343978 23823 file.cc:80]


def _set_parent_death_signal() -> None:  # pragma: no cover - runs in the child before exec
    """The child dies with its parent (Linux): a ``kill -9`` of the command stops the sweep."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def explain_fatal(text: str, settings: Settings) -> str:
    """One line for the runtime's fatal error ``text`` (its log, as the child printed it)."""
    me = settings.process_id
    where = f" at {settings.coordinator}" if settings.coordinator else ""
    resume = "run the same command in every process to resume (finished units are kept)"
    listed = re.search(r"unhealthy[^\n]*:\s*\n((?:\s*(?:/job:\S*task:)?\d+\s*\n?)+)", text)
    found = re.findall(r"task:(\d+)", text) + (re.findall(r"\d+", listed.group(1)) if listed else [])
    tasks = sorted({int(t) for t in found} - ({me} if me is not None else set()))
    who = f"process {', '.join(map(str, tasks))}" if tasks else "another process"
    t = f"{settings.timeout:g} s"
    if "RegisterTask" in text and ("DEADLINE_EXCEEDED" in text or "Deadline Exceeded" in text):
        if me == 0:
            n = settings.num_processes
            others = "--process-id 1" if n == 2 else f"each --process-id from 1 to {n - 1}"
            return (
                f"not all {n} processes joined within {t}: start the same command with {others} "
                "(--distributed-timeout sets the wait)"
            )
        return (
            f"could not join the coordinator{where} within {t}: start process 0 (--process-id 0) there with the "
            "same --num-processes, and give every process its own --process-id"
        )
    if "incarnation" in text or "restarted" in text:
        return (
            f"a second process with the same --process-id joined while the others ran, so the distributed runtime "
            f"stopped every process: give each process its own id and {resume}"
        )
    if "unhealthy" in text or "heartbeat" in text.lower():
        return f"{who} stopped (killed, crashed or unreachable for {t}), so the runtime stopped this one too: {resume}"
    if "Connection refused" in text or "Failed to connect" in text or "UNAVAILABLE" in text:
        return f"lost the coordinator{where} (process 0 stopped?): {resume}"
    status = next((line for line in text.splitlines() if line.startswith("F")), text.strip()[:200])
    status = _GLOG.sub("", status).strip()[:200]
    return f"the distributed runtime stopped this process ({status}): {resume}"


def supervise(argv: Sequence[str], settings: Settings, out: str | None, err=None) -> int:
    """Run ``jaxpull ARGV`` in a child process that joins the runtime; its output passes through
    (the runtime's log lines are held back) and a fatal error of the runtime becomes one line
    ``jaxpull: error: ...``. Returns the exit status (2 for any error). An output directory the
    child created and left holding only its lock is removed."""
    err = err or sys.stderr
    out_path = Path(out) if out else None
    existed = out_path is None or out_path.exists()
    env = dict(os.environ, **{WORKER_ENV: "1"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxpull.shell.cli", *argv],
        stderr=subprocess.PIPE,
        env=env,
        preexec_fn=_set_parent_death_signal,
    )
    held: list[str] = []
    said = threading.Event()  # the child printed its own one-line error

    def pump() -> None:
        buffer, runtime = b"", False  # runtime: after a log line of the runtime (its messages span lines)
        while True:
            data = os.read(proc.stderr.fileno(), 65536)
            if not data:
                break
            buffer += data
            *records, buffer = re.split(rb"(?<=[\r\n])", buffer)
            for record in records:
                text = record.decode(errors="replace")
                line = text.strip("\r\n")
                if _GLOG.match(line):
                    runtime = True
                if _GLOG.match(line) or (runtime and not _OURS.match(line)):
                    held.append(line)
                    continue
                if line.startswith("jaxpull: error:"):
                    said.set()
                err.write(text)
                err.flush()
        if buffer:
            err.write(buffer.decode(errors="replace"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    forwarded = []

    def forward(signum, frame):
        forwarded.append(signum)
        proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = proc.wait()
        reader.join()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if not existed and out_path is not None:
        from jaxpull.files.sweep_store import remove_if_only_locks

        remove_if_only_locks(out_path)
    if code in (0, 1, 2) or said.is_set():
        return 2 if code != 0 else 0
    if forwarded:
        print("jaxpull: interrupted", file=err)
        return 130
    text = "\n".join(held)
    print(f"jaxpull: error: {explain_fatal(text, settings)}", file=err)
    return 2


def is_worker() -> bool:
    """Whether this process is the child of :func:`supervise`."""
    return os.environ.get(WORKER_ENV) == "1"


def joined(settings: Settings, out: str | None, then: Callable[[], object], what="sweep", flag="--out"):
    """In the child: take this process's lock on ``out`` (so a second process with the same id is
    refused before it can disturb the runtime), join the runtime, and run ``then`` holding it.
    ``what`` and ``flag`` name the run and its directory in the lock's messages."""
    from jaxpull.files.sweep_store import output_lock

    if settings.explicit and out is not None:
        with output_lock(out, settings.process_id, what, flag):
            initialize(settings)
            return then()
    initialize(settings)
    return then()
