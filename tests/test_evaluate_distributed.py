"""``jaxpull evaluate`` over several processes on JAX's distributed runtime: two CPU processes on
loopback with a real ``jax.distributed`` coordinator, the same command in each (or, as process 0,
its Python function after ``jaxpull.shell.distributed.initialize``).

The evaluation is test_evaluate.py's smallest (its one-layer ViT for 32-pixel images, three
photos in class folders, two explainers, Faithfulness, batches of 2: two image units per
explainer, four (unit, explainer) pairs, two per process). Every run uses the same relative
``--work-dir work -o report.md`` in a folder of its own, so the command the report records is the
same, and the reports are compared byte for byte. Ports are free loopback ports; timeouts are 10 s
or less.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_evaluate import PHOTO_CLASSES, small_model_file

from helpers import assert_one_line_error
from jaxpull.evaluation import runner
from sweep_helpers import JAXPULL, env, free_port

TIMEOUT = 10  # --distributed-timeout of these runs (joining, start-up checks, heartbeats)
UNITS = "process {} of 2: {} of its 2 units to compute (of 4)"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The model file and an ImageNet-style folder of three photos, one per class."""
    from jaxpull.files import images as image_io

    d = tmp_path_factory.mktemp("dist")
    for name, (wnid, _) in PHOTO_CLASSES.items():
        (d / "val" / wnid).mkdir(parents=True)
        shutil.copy(image_io.sample_paths([name])[0], d / "val" / wnid / f"{name}.png")
    return small_model_file(d / "vit.safetensors"), d / "val"


def args(files, *extra) -> list:
    model, folder = files
    return [
        "evaluate",
        "--images",
        str(folder),
        "--model",
        str(model),
        "--labels",
        "folders",
        "--explainers",
        "pullback,gradient",
        "--metrics",
        "faithfulness",
        "--batch-size",
        "2",
        "--resamples",
        "200",
        "--work-dir",
        "work",
        "-o",
        "report.md",
        "--distributed-timeout",
        str(TIMEOUT),
        *map(str, extra),
    ]


def peers(port: int, i: int) -> list:
    return ["--coordinator", f"127.0.0.1:{port}", "--num-processes", 2, "--process-id", i]


def start(argv, cwd: Path) -> subprocess.Popen:
    cwd.mkdir(exist_ok=True)
    return subprocess.Popen(
        JAXPULL + argv, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen, limit: float = 120) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=limit)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# Process 0 in Python: a runtime joined first, then the command's function (it finds the runtime)
PYTHON_PROCESS = """
from jaxpull.shell import distributed, tasks
distributed.initialize(distributed.Settings({coordinator!r}, 2, 0, {timeout}))
tasks.evaluate([{folder!r}], {model!r}, "report.md", labels="folders", explainer_names=["pullback", "gradient"],
               metric_names=["faithfulness"], batch_size=2, resamples=200, work_dir="work", command={command!r})
"""


def python_process(files, port: int, cwd: Path) -> subprocess.Popen:
    """Process 0 as :data:`PYTHON_PROCESS`, recording the command line's command."""
    from jaxpull.shell import cli

    argv = args(files)
    command = cli._recorded(argv, cli.build_parser().parse_args(argv).distributed_flags)
    code = PYTHON_PROCESS.format(
        coordinator=f"127.0.0.1:{port}", timeout=TIMEOUT, folder=str(files[1]), model=str(files[0]), command=command
    )
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def two_processes(files, cwd: Path, python: bool = False) -> tuple:
    """The command in two processes (process 0 in Python with ``python``), both finished."""
    port = free_port()
    p0 = python_process(files, port, cwd) if python else start(args(files, *peers(port, 0)), cwd)
    p1 = start(args(files, *peers(port, 1)), cwd)
    r0, r1 = finish(p0), finish(p1)
    assert r0.returncode == 0 and r1.returncode == 0, (r0.stderr[-2000:], r1.stderr[-2000:])
    return r0, r1


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory) -> Path:
    """The folder of the same evaluation run by one process (no distributed flags)."""
    d = tmp_path_factory.mktemp("one")
    proc = finish(start(args(files), d))
    assert proc.returncode == 0, proc.stderr
    return d


def same_report(d: Path, reference: Path) -> None:
    for name in ("report.md", "report.csv"):
        assert subprocess.run(["cmp", d / name, reference / name]).returncode == 0, name
    assert "--coordinator" not in (d / "report.md").read_text()


def test_two_processes_write_the_report_one_process_writes(files, reference, tmp_path):
    r0, r1 = two_processes(files, tmp_path)
    assert UNITS.format(0, 2) in r0.stdout and UNITS.format(1, 2) in r1.stdout
    assert "process 1 of 2 finished its units: process 0 writes report.md and report.csv" in r1.stdout
    assert "wrote report.md" in r0.stdout and "wrote" not in r1.stdout
    same_report(tmp_path, reference)
    # every unit in the shared work directory, and each explainer's folder described
    work = tmp_path / "work"
    assert sorted(p.name for p in work.rglob("*.npz")) == ["images-000000.npz"] * 2 + ["images-000001.npz"] * 2
    assert len(list(work.glob("*/explainer.json"))) == 2


def test_a_rerun_computes_only_the_missing_units(files, reference, tmp_path):
    """A one-process run's work directory, one unit of each explainer lost (killed before it was
    written), resumed by two processes, process 0 in Python: each computes its missing unit only."""
    shutil.copytree(reference / "work", tmp_path / "work")
    units = sorted((tmp_path / "work").rglob("*.npz"))
    lost = [u for u in units if u.name == "images-000001.npz"]
    kept = {u: u.stat().st_mtime_ns for u in units if u not in lost}
    assert len(lost) == 2 and len(kept) == 2
    for u in lost:
        u.unlink()
    r0, r1 = two_processes(files, tmp_path, python=True)
    assert UNITS.format(0, 1) in r0.stdout and UNITS.format(1, 1) in r1.stdout
    assert all(u.stat().st_mtime_ns == t for u, t in kept.items())  # not written again
    same_report(tmp_path, reference)


def test_bad_distributed_settings_are_one_line_errors(files, tmp_path):
    """Two commands claim process id 1, and nobody runs process 0: one is refused at once by its
    lock, the other cannot join the coordinator within its timeout; nothing is left behind."""
    port, started = free_port(), time.time()
    ones = [start(args(files, *peers(port, 1), "--distributed-timeout", 3), tmp_path) for _ in range(2)]
    results = [finish(p) for p in ones]
    seconds = time.time() - started
    refused = next(r for r in results if "another process with --process-id 1" in r.stderr)
    assert_one_line_error(refused, "is writing to 'work'", "give each process its own --process-id")
    alone = next(r for r in results if r is not refused)
    assert_one_line_error(alone, "could not join the coordinator at 127.0.0.1:", "within 3 s")
    assert seconds < 3 + 25, seconds
    assert list(tmp_path.iterdir()) == []
    # several processes share their units through one work directory: it must be given (checked
    # before joining the runtime)
    from jaxpull.shell import distributed, tasks

    two = distributed.Settings(f"127.0.0.1:{port}", 2, 0)
    with pytest.raises(
        ValueError, match="over 2 processes shares its units through one work directory: give --work-dir"
    ):
        tasks.evaluate([str(files[1])], str(files[0]), str(tmp_path / "r.md"), processes=two)
    assert list(tmp_path.iterdir()) == []


class ThreadGroup:
    """Processes as threads of this one, exchanging through a dict: the duck type of group that
    ``runner.run`` takes (``jaxpull.shell.distributed.RuntimeGroup`` on the real runtime)."""

    count, timeout = 2, 10

    def __init__(self, index: int, shared: dict, barrier: threading.Barrier):
        self.index, self.shared, self.barrier = index, shared, barrier

    def gather(self, stage: str, value: str, timeout) -> list:
        self.shared[(stage, self.index)] = value
        self.barrier.wait(timeout)
        return [self.shared[(stage, j)] for j in range(self.count)]


def start_together(works: list, manifests: list) -> list:
    """Two processes (threads) opening their work directories: each one's error, or None."""
    shared, barrier, errors = {}, threading.Barrier(2), [None, None]

    def process(i: int) -> None:
        try:
            with runner.work_directory(works[i], manifests[i], ThreadGroup(i, shared, barrier)):
                barrier.wait(10)
        except ValueError as e:
            errors[i] = str(e)

    threads = [threading.Thread(target=process, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return errors


def test_processes_check_they_run_one_evaluation_in_one_directory(tmp_path):
    """The start-up checks of the processes (threads here: the exchange is the runtime's in the
    tests above): the same manifest, and a work directory each sees the others' files in; every
    process stops with the same one-line error otherwise, leaving nothing behind."""
    manifest = dict(format=1, seed=0, labels=[1, 2])
    errors = start_together([tmp_path / "w"] * 2, [manifest, dict(manifest, seed=1)])
    assert errors[0] == errors[1] and "process 1 runs a different evaluation than process 0 (seed differ)" in errors[0]
    errors = start_together([tmp_path / "a", tmp_path / "b"], [manifest] * 2)
    assert all("does not see the files process" in e and "on a filesystem every process shares" in e for e in errors)
    assert list(tmp_path.iterdir()) == []
    assert start_together([tmp_path / "w"] * 2, [manifest] * 2) == [None, None]
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == [".lock", ".lock.1", "manifest.json"]


def test_the_report_records_the_command_without_the_distributed_flags():
    from jaxpull.shell import cli

    argv = ["evaluate", "--images", "a b", "--coord=h:1", "--num-processes", "2", "--process-id", "1"]
    argv += ["--distributed-t", "5", "--seed", "3", "-o", "r.md"]
    flags = cli.build_parser().parse_args(argv).distributed_flags
    assert cli._recorded(argv, flags) == "jaxpull evaluate --images 'a b' --seed 3 -o r.md"
