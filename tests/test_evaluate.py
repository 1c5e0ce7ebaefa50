"""``jaxpull.evaluation.pipeline`` and the ``jaxpull evaluate`` command."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import images
from helpers import assert_one_line_error, run, run_in_process

from jaxpull.evaluation import pipeline


def test_bootstrap_intervals():
    rng = np.random.default_rng(0)
    assert pipeline.bootstrap_ci(np.full(10, 0.25), 200, rng) == (0.25, 0.25, 0.25)
    mean, lo, hi = pipeline.bootstrap_ci(np.array([0.0, 1.0] * 20 + [np.nan]), 2000, rng)
    assert mean == 0.5 and 0.3 < lo < 0.5 < hi < 0.7
    a = rng.normal(size=30)
    # paired: a constant shift is known exactly, however noisy the items are
    assert pipeline.paired_difference(a + 1.0, a, 500, rng)[:3] == pytest.approx((1.0, 1.0, 1.0))
    b = a.copy()
    b[3] = np.nan
    assert pipeline.paired_difference(a, b, 100, rng)[3] == 29


def test_imagenet_style_folders_give_sorted_class_indices(tmp_path):
    from jaxpull.files import images as image_io

    photos = image_io.sample_paths(["chelsea", "coffee", "rocket"])
    for wnid, photo in zip(["n03", "n01", "n02"], photos):
        (tmp_path / wnid).mkdir()
        shutil.copy(photo, tmp_path / wnid / f"a{photo.suffix}")
        shutil.copy(photo, tmp_path / wnid / f"b{photo.suffix}")
    (tmp_path / "n01" / "notes.txt").write_text("not an image")
    paths, classes = pipeline.find_images([tmp_path])
    assert classes == [0, 1, 2, 0, 1, 2]  # n01 -> 0, n02 -> 1, n03 -> 2, classes in turn
    assert [p.parent.name for p in paths] == ["n01", "n02", "n03"] * 2
    assert pipeline.find_images([tmp_path], limit=4)[1] == [0, 1, 2, 0]
    files, none = pipeline.find_images(photos)
    assert files == photos and none is None
    with pytest.raises(ValueError, match="does not exist"):
        pipeline.find_images([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        pipeline.find_images([tmp_path / "empty"])


def test_evaluate_report(tiny_model):
    x = images(6, 32)
    report = pipeline.evaluate(
        tiny_model,
        x,
        classes=[0, 1, 2, 0, 1, 2],
        explainer_names=["pullback", "gradient"],
        metric_names=["focus", "faithfulness", "randomization"],
        mosaics=5,
        stages=2,
        progress=False,
    )
    assert set(report.scores) == {"focus", "faithfulness", "randomization"}
    assert report.scores["focus"]["gradient"].shape == (5,) and report.scores["faithfulness"]["pullback"].shape == (6,)
    assert report.curves["pullback"].shape == (2, 6) and len(report.stage_names) == 2
    rows = pipeline.summary_rows(report, 200)
    assert len(rows) == 6 and all(np.isnan(r["diff"]) for r in rows if r["explainer"] == "gradient")
    text = pipeline.to_markdown(report, rows, "jaxpull evaluate ...")
    assert "## focus (higher is better)" in text and "| pullback | 5 |" in text and "Sanity verdict" in text
    csv = pipeline.to_csv(rows).splitlines()
    assert csv[0].startswith("metric,explainer,n,mean,ci_low,ci_high,diff") and len(csv) == 7
    again = pipeline.evaluate(
        tiny_model,
        x,
        classes=[0, 1, 2, 0, 1, 2],
        explainer_names=["pullback", "gradient"],
        metric_names=["focus", "faithfulness", "randomization"],
        mosaics=5,
        stages=2,
        progress=False,
    )
    assert pipeline.to_csv(pipeline.summary_rows(again, 200)) == pipeline.to_csv(rows)  # the seed reproduces it
    with pytest.raises(ValueError, match="unknown metric 'accuracy'"):
        pipeline.evaluate(tiny_model, x, metric_names=["accuracy"])
    with pytest.raises(ValueError, match="options given for explainers not chosen"):
        pipeline.evaluate(tiny_model, x, explainer_names=["gradient"], options={"pullback": {"temperature": 1.0}})


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory):
    from jaxpull.files import images as image_io

    root = tmp_path_factory.mktemp("val")
    for wnid, name in zip(["n01", "n02", "n03"], ["chelsea", "coffee", "rocket"]):
        (root / wnid).mkdir()
        shutil.copy(image_io.sample_paths([name])[0], root / wnid / f"{name}.png")
    return root


def test_evaluate_command(model_file, class_folder, tmp_path):
    out = tmp_path / "report.md"
    proc = run(
        "evaluate",
        "--images",
        class_folder,
        "--model",
        model_file,
        "--labels",
        "folders",
        "--explainers",
        "pullback,gradient",
        "--metrics",
        "focus,faithfulness",
        "--mosaics",
        4,
        "-o",
        out,
    )
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert "| pullback | 4 |" in text and "| gradient | 3 |" in text and "--labels folders" in text
    assert (tmp_path / "report.csv").read_text().count("\n") == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.csv", "report.md"]


def test_evaluate_command_bad_input(model_file, class_folder, tmp_path):
    out = tmp_path / "r.md"
    base = ["--model", model_file, "-o", out]
    cases = [
        (["--images", class_folder, "--explainers", "lime"], "unknown explainer 'lime'"),
        (["--images", class_folder, "--metrics", "accuracy"], "unknown metric 'accuracy'"),
        (["--images", class_folder, "--mosaics", "0"], "--mosaics must be a positive integer"),
        (["--images", tmp_path / "missing"], "does not exist"),
        (["--images", class_folder / "n01" / "chelsea.png", "--labels", "folders"], "--labels folders needs"),
        # a random network calls every photo the same class: too few classes for mosaics
        (
            ["--images", class_folder / "n01" / "chelsea.png", class_folder / "n02" / "coffee.png"],
            "at least 3 distinct classes",
        ),
        (["--images", class_folder, "--temperature", "-1"], "--temperature must be a positive number"),
    ]
    for i, (args, fragment) in enumerate(cases):  # the first as a real process, the others in this one
        proc = (run if i == 0 else run_in_process)("evaluate", *args, *base)
        assert_one_line_error(proc, fragment)
    assert list(tmp_path.iterdir()) == []
    proc = run_in_process("evaluate", "--images", class_folder, "--model", model_file, "-o", tmp_path / "r.txt")
    assert_one_line_error(proc, "must end in .md")
