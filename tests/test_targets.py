"""Target choice and the command bodies as library calls (no subprocess): label specs, the
paper's figure layout, ``jaxpull.shell.tasks``' explain and paper figure."""

from __future__ import annotations

import types

import numpy as np
import pytest
from PIL import Image

import jaxpull
from conftest import images
from jaxpull.core import targets
from jaxpull.shell import tasks

NAMED = types.SimpleNamespace(
    num_classes=5,
    class_names=("tench", "goldfish", "shark", "hen", "ostrich"),
    label=lambda v: (
        ["tench", "goldfish", "shark", "hen", "ostrich"].index(v) if isinstance(v, str) and not v.isdigit() else int(v)
    ),
    class_name=lambda i: ["tench", "goldfish", "shark", "hen", "ostrich"][i],
)
LOGITS = np.array([[0.0, 3.0, 1.0, 2.0, -1.0], [5.0, 0.0, 1.0, 2.0, 4.0]], np.float32)


def test_resolve_targets_mixes_indices_names_and_each_images_top_n():
    got = targets.resolve_targets(NAMED, LOGITS, "0, shark,top2")
    assert got.dtype == np.int32 and got.tolist() == [[0, 2, 1, 3], [0, 2, 0, 4]]
    with pytest.raises(ValueError, match="--targets is empty"):
        targets.resolve_targets(NAMED, LOGITS, " , ")
    with pytest.raises(ValueError, match=r"top6: n must be in \[1, 5\]"):
        targets.resolve_targets(NAMED, LOGITS, "top6")


def test_parse_labels_reads_all_ranges_and_lists():
    assert targets.parse_labels("all", NAMED) == [0, 1, 2, 3, 4]
    assert targets.parse_labels("1-3", NAMED) == [1, 2, 3]
    assert targets.parse_labels("ostrich,0-1", NAMED) == [4, 0, 1]
    with pytest.raises(ValueError, match="--labels is empty"):
        targets.parse_labels(",", NAMED)


def test_paper_layout_puts_each_images_own_label_once_then_a_random_other():
    logits = np.array([[0, 9, 0, 0, 0], [0, 9, 0, 0, 0], [9, 0, 0, 0, 0]], np.float32)
    columns, own = targets.paper_layout(logits, seed=0)
    assert columns[:2].tolist() == [1, 0] and own == [0, 0, 1]  # two images share their top-1 column
    assert len(columns) == 3 and columns[2] not in (0, 1)
    assert targets.paper_layout(logits, seed=0)[0].tolist() == columns.tolist()  # the seed fixes the extra label
    assert {int(targets.paper_layout(logits, seed=s)[0][2]) for s in range(20)} == {2, 3, 4}
    with pytest.raises(ValueError, match="--seed must be a non-negative"):
        targets.paper_layout(logits, seed=-1)


def test_top5_lines_name_labels_with_probabilities():
    line = targets.top5_lines(NAMED, ["a"], LOGITS[:1])[0]
    assert line.startswith("a: goldfish (1) 63.6%; hen (3) 23.4%; shark (2) 8.6%")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    model = jaxpull.load(_save_tiny(d))
    paths = []
    for i, img in enumerate(images(2, 40, seed=3)):
        paths.append(d / f"img{i}.png")
        Image.fromarray(((img + 1) * 127.5).astype(np.uint8)).save(paths[-1])
    return model, d / "tiny.safetensors", paths


def _save_tiny(d):
    from conftest import torch_and_jax

    jaxpull.save(torch_and_jax("resnet18", 10)[1], d / "tiny.safetensors")
    return d / "tiny.safetensors"


def test_explain_task_writes_figure_and_arrays_with_every_resolved_setting(files, tmp_path):
    model, path, paths = files
    lines = []
    results = tasks.explain(
        str(path),
        [str(p) for p in paths],
        tmp_path / "f.png",
        target_spec="3,top1",
        arrays_path=tmp_path / "a.npz",
        steps=2,
        rules="semantic",
        log=lines.append,
        progress=False,
    )
    assert set(results) == {"pullback", "vanilla"} and results["pullback"].shape[:2] == (2, 2)
    saved = np.load(tmp_path / "a.npz")
    assert saved["targets"][:, 0].tolist() == [3, 3] and float(saved["steps"]) == 2
    assert float(saved["temperature"]) == 0.6 and np.isnan(saved["eps"])  # the semantic preset, eps None
    assert str(saved["rules"]) == "semantic" and str(saved["max_pool"]) == "detached"  # every setting recorded
    # the arrays are the figure's: the same call through jaxpull.ascent
    x = saved["images"]
    direct = jaxpull.ascent(model, x[:1], saved["targets"][:1], rules="semantic", steps=2, output="diff")
    np.testing.assert_allclose(saved["pullback_diff"][:1], direct, atol=1e-6)
    assert lines[0].startswith("img0: ") and lines[-1] == f"wrote {tmp_path / 'a.npz'}"
    with pytest.raises(ValueError, match="unknown method"):
        tasks.explain(str(path), [str(paths[0])], tmp_path / "g.png", method="guided")
    with pytest.raises(ValueError, match="steps"):
        tasks.explain(str(path), [str(paths[0])], tmp_path / "g.png", steps=-1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "f.png"]  # nothing written by the failures


def test_paper_figure_rows_follow_the_layout(files, tmp_path):
    model, _, paths = files
    x = images(2, 40, seed=3)
    methods = {"excitation": dict(rules="excitation", steps=1), "vanilla": dict(rules="vanilla", steps=1)}
    rows = tasks.paper_figure(model, x, ["a", "b"], tmp_path / "p.png", seed=1, methods=methods, progress=False)
    columns, _ = targets.paper_layout(np.asarray(model(x)), seed=1)
    assert rows["excitation"].shape == (2, len(columns), 40, 40, 3) and (tmp_path / "p.png").is_file()
    direct = jaxpull.ascent(model, x[1:], columns[None], rules="vanilla", steps=1, output="diff")
    np.testing.assert_allclose(rows["vanilla"][1:], direct, atol=1e-6)
