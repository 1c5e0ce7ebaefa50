"""No import cycle: jaxpull never imports its optional converter, which registers itself through
package entry points (jaxpull/plugins.py); what it registers is what jaxpull finds."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import tomllib

from helpers import assert_one_line_error, run_in_process
from jaxpull import plugins

ROOT = Path(__file__).resolve().parent.parent
CONVERTER = "jaxpull_convert"


def converter_imports(source: str, filename: str = "<source>") -> list:
    """``file:line`` of every import of the converter in ``source``: ``import`` and ``from``
    statements at any depth (inside functions too), and ``importlib.import_module`` /
    ``__import__`` of a literal name."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        if any(n == CONVERTER or n.startswith(CONVERTER + ".") for n in names):
            found.append(f"{filename}:{node.lineno}")
    return found


def test_the_scan_finds_every_kind_of_import():
    planted = (
        "import os\n"
        "def f():\n    import jaxpull_convert\n"
        "def g():\n    from jaxpull_convert.offline import OFFLINE\n"
        "import importlib\nm = importlib.import_module('jaxpull_convert.pth')\n"
        "n = __import__('jaxpull_convert')\n"
        "from jaxpull import plugins\nimport jaxpull_converter_other\n"
    )
    assert converter_imports(planted) == ["<source>:3", "<source>:5", "<source>:7", "<source>:8"]


def test_no_module_of_jaxpull_imports_the_converter():
    files = sorted((ROOT / "jaxpull").rglob("*.py"))
    assert len(files) > 30
    found = [hit for f in files for hit in converter_imports(f.read_text(), str(f.relative_to(ROOT)))]
    assert found == [], f"jaxpull must reach the converter through jaxpull.plugins only: {found}"


def test_the_converter_registers_what_jaxpull_looks_up():
    """pyproject.toml declares the entry points; each names an importable object, and the
    installed metadata (pip install -e .) gives jaxpull exactly those objects."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    assert set(declared) == {plugins.OFFLINE_MODELS, plugins.COMMANDS}
    for group, entries in declared.items():
        expected = {}
        for name, value in entries.items():
            module, attr = value.split(":")
            expected[name] = getattr(importlib.import_module(module), attr)
        assert dict(plugins.load(group)) == expected, f"reinstall (pip install -e .): {group} is stale"
    offline = dict(plugins.load(plugins.OFFLINE_MODELS))["offline_table"]
    assert {"mobilenet_v2", "efficientnet_lite0"} <= set(offline.names())


def test_without_the_converter_convert_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setattr(plugins, "load", lambda group: [])
    proc = run_in_process("convert", "resnet18", "--state-dict", tmp_path / "x.pth", "-o", tmp_path / "x.safetensors")
    assert_one_line_error(proc, "comes with jaxpull's converter", "pip install")
    assert list(tmp_path.iterdir()) == []
