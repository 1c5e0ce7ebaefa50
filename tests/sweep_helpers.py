"""What the sweep tests share: a small model file whose images load at 64x64, a photo, and the
environment of ``jaxpull sweep`` subprocesses."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

SIZE = 64  # the model file's crop size: the images of a sweep load at 64x64


def small_model_file(directory: Path, num_classes: int = 100) -> Path:
    """A random squeezenet1_1 (quick to compile; max-pools) with ``num_classes`` classes, saved with
    preprocessing that loads images at 64x64."""
    import jaxpull
    import jaxpull_convert
    from jaxpull.core.model import Model
    from jaxpull.core.preprocessing import Preprocessing
    from jaxpull_convert.testing import random_torchvision_model

    m = jaxpull_convert.from_torch_module("squeezenet1_1", random_torchvision_model("squeezenet1_1", num_classes))
    m = Model(m.params, dataclasses.replace(m.spec, preprocessing=Preprocessing(SIZE, SIZE)))
    path = directory / "squeezenet.safetensors"
    jaxpull.save(m, path)
    return path


def photo(directory: Path) -> Path:
    """A random 80x90 RGB picture (not square: resized and centre-cropped)."""
    from PIL import Image

    path = directory / "photo.png"
    pixels = np.random.default_rng(0).uniform(0, 255, (80, 90, 3)).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def env(**extra) -> dict:
    """The environment of a ``jaxpull`` subprocess: XLA's quick compile (lower backend effort, about
    half the compile time; the processes compared with each other all use it)."""
    return dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="1", **extra)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


JAXPULL = [sys.executable, "-m", "jaxpull.shell.cli"]


def assert_error_after_progress(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit status 2, and beside the progress bars exactly one stderr line, ``jaxpull: error: ...``
    with ``fragments`` (no traceback, none of the distributed runtime's log)."""
    assert proc.returncode == 2, proc.stderr
    progress = ("sweep (", "explaining:")  # tqdm's bars of the sweep and of explain
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip() and not line.startswith(progress)]
    assert len(lines) == 1 and lines[0].startswith("jaxpull: error: "), proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
