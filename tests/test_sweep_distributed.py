"""Sweeps over several processes on JAX's distributed runtime: two CPU processes on loopback with a
real ``jax.distributed`` coordinator, the same command in each (or the Python ``sweep`` in one).

Each test runs ``jaxpull sweep`` as subprocesses (a small squeezenet, one 64x64 photo, 40 labels
in units of 2) and compares the output directory with a one-process run's, file by file and byte
by byte (the manifest aside). Ports are free loopback ports; timeouts are 10 s or less.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import assert_one_line_error, run_in_process
from sweep_helpers import JAXPULL, assert_error_after_progress, env, free_port, photo, small_model_file

TIMEOUT = 10  # --distributed-timeout of these runs (joining, start-up checks, heartbeats)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    return small_model_file(d), photo(d)


def args(files, out, *extra) -> list:
    model, image = files
    return [
        "sweep",
        str(image),
        "--model",
        str(model),
        "--labels",
        "0-39",
        "--reduce",
        "norms",
        "--chunk-size",
        "2",
        "--distributed-timeout",
        str(TIMEOUT),
        "--out",
        str(out),
        *map(str, extra),
    ]


def start(argv, **kw) -> subprocess.Popen:
    return subprocess.Popen(JAXPULL + argv, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def finish(proc: subprocess.Popen, limit: float = 240) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=limit)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def peers(port: int, i: int) -> list:
    return ["--coordinator", f"127.0.0.1:{port}", "--num-processes", 2, "--process-id", i]


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory) -> Path:
    """The output directory of the same sweep run by one process."""
    out = tmp_path_factory.mktemp("one") / "sweep"
    proc = finish(start(args(files, out)))
    assert proc.returncode == 0, proc.stderr
    return out


def same_as(out: Path, reference: Path) -> None:
    """``out`` holds the files of ``reference`` with the same bytes (``manifest.json`` aside)."""
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in reference.iterdir()), names
    for name in names:
        if name != "manifest.json":
            assert subprocess.run(["cmp", out / name, reference / name]).returncode == 0, name
    assert json.loads((out / "manifest.json").read_text())["complete"] is True


PYTHON_PROCESS = """
from jaxpull.files import images
from jaxpull.shell import distributed, sweep
distributed.initialize(distributed.Settings({coordinator!r}, 2, 0, 60))
import jaxpull
model = jaxpull.load({model!r})
x = images.load_images([{image!r}], **model.preprocessing.image_options)
r = sweep.sweep(model, x, range(40), reduce="norms", chunk_size=2, out={out!r}, progress=False)
print("python process", r["norms"].shape)
"""


def test_two_processes_write_the_bytes_one_process_writes(files, reference, tmp_path):
    """Two commands claim process id 1: one is refused in one line (its lock is taken before it joins
    the runtime, so it cannot disturb the sweep); process 0 is the Python sweep; the result has the
    bytes of the one-process run."""
    out, port = tmp_path / "sweep", free_port()
    ones = [start(args(files, out, *peers(port, 1), "--distributed-timeout", 60)) for _ in range(2)]
    deadline = time.time() + 60
    while all(p.poll() is None for p in ones):
        assert time.time() < deadline
        time.sleep(0.05)
    refused = next(p for p in ones if p.poll() is not None)
    assert_one_line_error(finish(refused), "another process with --process-id 1 is writing to", "its own --process-id")
    p1 = next(p for p in ones if p is not refused)
    code = PYTHON_PROCESS.format(
        coordinator=f"127.0.0.1:{port}", model=str(files[0]), image=str(files[1]), out=str(out)
    )
    p0 = subprocess.Popen(
        [sys.executable, "-c", code], env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    r0, r1 = finish(p0), finish(p1)
    assert r0.returncode == 0 and r1.returncode == 0, (r0.stderr[-2000:], r1.stderr[-2000:])
    assert "python process (1, 1, 40)" in r0.stdout and "process 1 of 2: 10 units of 2 labels" in r1.stderr
    same_as(out, reference)
    assert json.loads((out / "manifest.json").read_text())["process_counts"] == [2]


def _units_of_process_1(out: Path) -> list:
    """Unit files covering labels 20-39 (process 1's half of the 20 units)."""
    found = (out / "units").glob("*.npy") if (out / "units").is_dir() else []
    return [f for f in found if int(re.search(r"\.l(\d+)-", f.name).group(1)) >= 20]


def test_a_killed_process_resumes_without_redoing_its_units(files, reference, tmp_path):
    out, port = tmp_path / "sweep", free_port()
    p0, p1 = start(args(files, out, *peers(port, 0))), start(args(files, out, *peers(port, 1)))
    deadline = time.time() + 120
    while len(_units_of_process_1(out)) < 2:
        assert time.time() < deadline and p1.poll() is None, finish(p1).stderr[-2000:]
        time.sleep(0.001)
    p1.send_signal(signal.SIGKILL)  # the command; its child, which joined the runtime, dies with it
    killed = time.time()
    finish(p1)
    r0 = finish(p0)
    waited = time.time() - killed
    assert_error_after_progress(r0, "process 1 stopped", "run the same command in every process to resume")
    assert waited < TIMEOUT + 15, waited  # found by the runtime's heartbeats
    before = {f.name: f.stat().st_ino for f in (out / "units").iterdir()}
    ones = len(_units_of_process_1(out))
    assert 2 <= ones < 10  # killed mid-run
    # restarted: each process computes only what is missing
    port = free_port()
    p0, p1 = start(args(files, out, *peers(port, 0))), start(args(files, out, *peers(port, 1)))
    r0, r1 = finish(p0), finish(p1)
    assert r0.returncode == 0 and r1.returncode == 0, (r0.stderr[-2000:], r1.stderr[-2000:])
    zeros = len(before) - ones
    assert f"process 0 of 2: {10 - zeros} units of 2 labels" in r0.stderr
    assert f"process 1 of 2: {10 - ones} units of 2 labels, {ones} done before" in r1.stderr
    same_as(out, reference)
    assert len(before) >= 2 and all(isinstance(v, int) for v in before.values())


def test_bad_distributed_settings_are_one_line_errors_in_bounded_time(files, tmp_path):
    out = tmp_path / "sweep"
    for flags, message in [
        (peers(1234, 2), "--process-id 2 is out of range: with --num-processes 2 use 0 to 1"),
        (["--coordinator", "nowhere", "--num-processes", 2, "--process-id", 0], "is not HOST:PORT"),
        (["--coordinator", "127.0.0.1:1234", "--num-processes", 2], "go together: give all three"),
        (["--coordinator", "127.0.0.1:1234", "--num-processes", 0, "--process-id", 0], "--num-processes must be"),
        (["--distributed-timeout", "0"], "--distributed-timeout must be between 1 and 86400 seconds"),
    ]:
        assert_one_line_error(run_in_process(*args(files, out, *flags)), message)
    # nobody at the coordinator's address: one line within the timeout (the runtime's own wait,
    # plus its start), nothing written
    start_time = time.time()
    alone = finish(start(args(files, out, *peers(free_port(), 1), "--distributed-timeout", 3)))
    seconds = time.time() - start_time
    assert_one_line_error(alone, "could not join the coordinator at 127.0.0.1:", "within 3 s")
    assert seconds < 3 + 20, seconds
    assert not out.exists()
    # each process with its own directory: not one shared directory
    port = free_port()
    a, b = tmp_path / "a", tmp_path / "b"
    pa, pb = start(args(files, a, *peers(port, 0))), start(args(files, b, *peers(port, 1)))
    for proc in (finish(pa), finish(pb)):
        assert_one_line_error(proc, "does not see the files process", "one directory on a filesystem every process")
    assert not a.exists() and not b.exists()


def test_different_sweeps_in_the_processes_are_refused(files, tmp_path):
    out, port = tmp_path / "sweep", free_port()
    other = args(files, out, *peers(port, 1))
    other[other.index("0-39")] = "0-38"
    p0, p1 = start(args(files, out, *peers(port, 0))), start(other)
    for proc in (finish(p0), finish(p1)):
        assert_one_line_error(proc, "process 1 runs a different sweep than process 0")
    assert not out.exists()


def test_python_sweep_without_out_is_refused_under_several_processes(files, tmp_path):
    port = free_port()
    code = """
import sys
from jaxpull.shell import distributed, sweep
distributed.initialize(distributed.Settings({coordinator!r}, 2, {i}, 10))
import jaxpull, numpy as np
model = jaxpull.load({model!r})
try:
    sweep.sweep(model, np.zeros((1, 64, 64, 3), np.float32), [1, 2], progress=False)
except ValueError as e:
    print(e)
"""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code.format(coordinator=f"127.0.0.1:{port}", i=i, model=str(files[0]))],
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in (0, 1)
    ]
    for p in procs:
        r = finish(p)
        assert "a sweep over 2 processes writes into one directory they share: give out=" in r.stdout, r.stderr[-2000:]
    assert os.listdir(tmp_path) == []
