"""CI executes the notebook on the offline model, so it cannot rot."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.large_models  # a kernel with real weights at 224 px: run alone (.ci/run)

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "pullbacks.ipynb"


def test_notebook_runs(tmp_path, monkeypatch, offline_cache):
    monkeypatch.setenv("JAXPULL_CACHE", str(offline_cache))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert (tmp_path / "pullbacks_mobilenet_v2.png").is_file()  # torchvision MobileNetV2, real weights, offline
    text = "".join(o.get("text", "") for o in outputs)
    assert "skipping resnet50" in text  # no torchvision ImageNet weights offline: said, not hidden
