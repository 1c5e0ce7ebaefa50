"""``jaxpull evaluate --protocol paper``: the paper's settings, its mosaics, the wiring of its
metrics (each proven equal to Quantus in test_metrics_quantus.py) and its table layout.

The model is test_evaluate.py's random one-layer ViT for 32-pixel images, where the paper's
settings scale to 16- and 8-pixel patches and 64 features per step.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_evaluate import class_folder, model_file, small_model  # noqa: F401 (fixtures)

from helpers import assert_one_line_error, run_in_process
from jaxpull.evaluation import (
    explainers,
    faithfulness,
    imagesource,
    metrics,
    mosaics,
    pipeline,
    protocol as protocols,
    report as reports,
    runner,
)

# less codegen effort: every metric compiles once and runs on a few 32-pixel images (conftest.py)
pytestmark = pytest.mark.quick_compile


def test_the_papers_settings_at_224_pixels():
    """At the paper's image size the scaled settings are its own (lib/evaluator.py, evaluate_focus.py)."""
    s = protocols.paper_settings(224, 224, 1000)
    assert s["infidelity"] == {"patch_sizes": [112, 56], "samples": 5, "low": -1.0, "high": 1.0}
    assert s["faithfulness_correlation"] == {"patch_sizes": [56], "baseline": 0.0, "abs": True}
    assert s["faithfulness_estimate"] == {"features_in_step": 3136, "baseline": 0.0, "abs": True}
    assert s["monotonicity_correlation"] == dict(
        features_in_step=3136, samples=10, low=-1.0, high=1.0, abs=True, eps=1e-12
    )
    assert s["max_sensitivity"] == {"radius": 0.02, "samples": 10}
    assert s["random_logit"] == {"num_classes": 1000, "seed": 42}
    assert s["focus"] == {"variant": "quantus", "tile": 112, "images": "repeated", "seed": 314}
    assert protocols.PAPER.default_metrics == (
        "infidelity",
        "faithfulness_correlation",
        "faithfulness_estimate",
        "monotonicity_correlation",
        "max_sensitivity",
        "random_logit",
        "focus",
    )
    # the table's names: 19 explainers, each pullback paired with its baseline, all in the registry
    assert len(explainers.PAPER_EXPLAINERS) == 19 and len(explainers.PAPER_PAIRS) == 9
    assert set(explainers.PAPER_PAIRS) | set(explainers.PAPER_PAIRS.values()) <= set(explainers.PAPER_EXPLAINERS)
    assert protocols.explainer_names(protocols.PAPER, None) == list(explainers.PAPER_EXPLAINERS)
    # options: a pullback form gets the rules and their settings, a baseline not; every ascent the
    # ascent settings; every noisy explainer --samples
    specs = protocols.explainer_specs(
        protocols.PAPER,
        ["PullbackAscent", "GradientAscent", "Gradient", "GradientShap", "FusionPullback"],
        "excitation",
        {"temperature": 0.5},
        {"steps": 3},
        samples=4,
    )
    asked = {s.label: (s.name, s.options) for s in specs}
    assert asked["PullbackAscent"] == ("PullbackAscent", {"rules": "excitation", "temperature": 0.5, "steps": 3})
    assert asked["GradientAscent"] == ("GradientAscent", {"steps": 3})
    assert asked["Gradient"] == ("Gradient", {})
    assert asked["GradientShap"] == ("GradientShap", {"samples": 4})
    assert asked["FusionPullback"] == ("FusionPullback", {"rules": "excitation", "temperature": 0.5, "samples": 4})
    assert protocols.pairs(list(asked)) == [("PullbackAscent", "GradientAscent")]
    spec = protocols.explainer_specs(protocols.PAPER, ["GradientAscentClipLast"], "semantic", {}, {"clip": "every"})
    with pytest.raises(ValueError, match="GradientAscentClipLast fixes its clamping: drop clip"):
        spec[0].map_function(None)(np.zeros((1, 8, 8, 3), np.float32), [0])  # refused before the model runs
    with pytest.raises(ValueError, match="infidelity has no setting 'sigma'"):
        protocols.metric_settings(protocols.PAPER, ["infidelity"], 32, 32, 10, {"infidelity": {"sigma": 1.0}})
    with pytest.raises(ValueError, match="monotonicity_correlation samples must be a whole number >= 1, got 0"):
        protocols.metric_settings(
            protocols.PAPER, ["monotonicity_correlation"], 32, 32, 10, {"monotonicity_correlation": {"samples": 0}}
        )


def test_mosaics_are_the_papers_and_the_quick_protocols():
    """Built batch by batch from the plan, reading only their source images, the mosaics equal
    make_paper_mosaics (the paper's draws and resizing) and make_mosaics (the quick protocol's)."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (7, 16, 16, 3)).astype(np.float32)
    classes = np.array([3, 1, 3, 5, 1, 8, 5])
    read = []

    class Source(imagesource.ArraySource):
        def load(self, index):
            read.append(len(index))
            return super().load(index)

    source = Source(x)
    for proto, want in (
        (protocols.PAPER, mosaics.make_paper_mosaics(x, classes, 5, seed=314, tile=8)),
        (protocols.QUICK, mosaics.make_mosaics(x, classes, 5, seed=2)),
    ):
        focus = protocols.metric_settings(proto, ["focus"], 16, 16, 10)["focus"]
        plan = protocols.plan_mosaics(proto, classes, 5, 2, focus)
        np.testing.assert_array_equal(plan.sources, want.sources)
        np.testing.assert_array_equal(plan.quadrants, want.quadrants)
        np.testing.assert_array_equal(plan.targets, want.targets)
        got = np.concatenate(
            [protocols.build_mosaics(proto, source, plan, s, focus) for s in (slice(0, 3), slice(3, 5))]
        )
        np.testing.assert_allclose(got, want.images, atol=1e-6)
    assert max(read) <= 7 and len(read) == 2  # the quick protocol reads each batch's sources once
    distinct = np.array([3, 1, 3, 5, 1, 5, 5])
    plan = protocols.plan_mosaics(protocols.PAPER, distinct, 6, 0, {**focus, "images": "distinct", "seed": 314})
    for q, src in zip(plan.quadrants, plan.sources, strict=True):
        assert src[q][0] != src[q][1]  # two different images of the target class


def test_report_layout_and_paired_differences():
    rng = np.random.default_rng(1)
    base = rng.normal(size=40)
    scores = {
        "infidelity": {"SoftPullback": base - 1.0, "Gradient": base},  # lower is better: SoftPullback better
        "focus": {"SoftPullback": base[:20] - 0.5, "Gradient": base[:20]},  # higher is better: worse
    }
    settings = protocols.paper_settings(32, 32, 10)
    report = reports.Report(
        scores,
        {},
        [],
        dict(
            protocol="paper",
            arch="vit_b_16",
            seed=0,
            images=40,
            mosaics=20,
            labels="class folders",
            batch=10,
            rules="semantic",
            explainers=["SoftPullback", "Gradient"],
            metric_settings=settings,
            options={},
            dropped={"GuidedGradCam": "no layer"},
        ),
    )
    texts = pipeline.render(report, "jaxpull evaluate --protocol paper ...", resamples=500)
    md, csv = texts["md"], texts["csv"].splitlines()
    assert (
        "| explainer | Infidelity ↓ | Focus ↑ |" in md and "| SoftPullback - Gradient | -1 [-1, -1] **better** |" in md
    )
    assert (
        "+-0.5" not in md and "| SoftPullback - Gradient | -1 [-1, -1] **better** | -0.5 [-0.5, -0.5] **worse** |" in md
    )
    assert "GuidedGradCam left out: no layer." in md
    assert "16, 8-pixel patches" in md and "(40 images)" in md and "(20 mosaics)" in md
    assert csv[0] == "kind,metric,explainer,baseline,n,mean,ci_low,ci_high" and len(csv) == 1 + 3 + 3
    assert "difference,infidelity,SoftPullback,Gradient,40,-1,-1,-1" in csv
    assert reports.fmt(83.3) == "83.3" and reports.fmt(0.7481) == "0.748" and reports.fmt(12345.0) == "1.23e+04"
    assert reports.fmt(0.0004) == "4.00e-04" and reports.fmt(0.1, signed=True) == "+0.1"


def test_the_papers_metrics_are_wired_as_their_functions(small_model):  # noqa: F811
    """The run's scores of a batch are the metric functions' on that batch with the paper's
    settings (scaled to 32 pixels), its key and its explainer; nothing else in between."""
    x = np.random.default_rng(3).uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
    labels = np.array([1, 4, 7])
    tuned = {
        "infidelity": {"samples": 2},
        "monotonicity_correlation": {"samples": 2},
        "max_sensitivity": {"samples": 2},
    }
    report = pipeline.evaluate(
        small_model,
        x,
        labels,
        protocol="paper",
        explainer_names=["SoftPullback"],
        metric_names=["infidelity", "faithfulness_estimate", "monotonicity_correlation", "max_sensitivity"]
        + ["random_logit", "faithfulness_correlation"],
        metric_settings=tuned,
        progress=False,
    )
    s = protocols.metric_settings(protocols.PAPER, [], 32, 32, 10, tuned)
    explain = protocols.ExplainerSpec("SoftPullback", {}).map_function(small_model)
    a = explain(x, labels)
    key = lambda metric: protocols.metric_key(0, metric, 0)[0]
    m, chunk = small_model, protocols.PERTURBATION_BATCH  # the run's chunks: the same computation
    want = {
        "infidelity": faithfulness.infidelity_paper(
            m, x, labels, a, key("infidelity"), (16, 8), samples=2, batch_size=chunk
        ),
        "faithfulness_correlation": faithfulness.faithfulness_correlation_paper(
            m, x, labels, a, (8,), batch_size=chunk
        ),
        "faithfulness_estimate": faithfulness.faithfulness_estimate(m, x, labels, a, 64, batch_size=chunk),
        "monotonicity_correlation": faithfulness.monotonicity_correlation(
            m, x, labels, a, key("monotonicity_correlation"), 64, samples=2, batch_size=chunk
        ),
        "max_sensitivity": metrics.max_sensitivity(explain, x, labels, a, key("max_sensitivity"), 0.02, 2),
        "random_logit": metrics.random_logit_paper(m, explain, x, labels, a, 10, 42, batch_size=3),
    }
    for metric, value in want.items():
        np.testing.assert_allclose(report.scores[metric]["SoftPullback"], value, rtol=1e-6, err_msg=metric)
    assert s["random_logit"] == {"num_classes": 10, "seed": 42}
    assert report.settings["metric_settings"]["infidelity"]["patch_sizes"] == [16, 8]


def test_paper_protocol_command(model_file, class_folder, tmp_path):  # noqa: F811
    out = tmp_path / "paper.md"
    args = ["--images", class_folder, "--model", model_file, "--labels", "folders", "--protocol", "paper"]
    args += ["--explainers", "SoftPullback,Gradient", "--metrics", "faithfulness_correlation,random_logit,focus"]
    proc = run_in_process(*["evaluate", *args, "--mosaics", 4, "--resamples", 200, "-o", out])
    assert proc.returncode == 0, proc.stderr
    md = out.read_text()
    assert "# The paper's evaluation protocol on vit_b_16" in md and "--protocol paper" in md
    assert "| explainer | Faithfulness Correlation ↑ | Random Logit ↓ | Focus ↑ |" in md
    assert "| SoftPullback |" in md and "| Gradient |" in md and "| SoftPullback - Gradient |" in md
    assert "3 images (class folders labels), 4 Focus mosaics, seed 0" in md
    assert "pullback explainers under the `semantic` rules" in md  # the paper's current rules by default
    assert "n02123045/chelsea.png (281 tabby)" in md
    csv = (tmp_path / "paper.csv").read_text().splitlines()
    assert len(csv) == 1 + 3 * 3  # two means and one difference per metric
    assert sorted(p.name for p in tmp_path.iterdir()) == ["paper.csv", "paper.md"]


def test_paper_protocol_bad_input(model_file, class_folder, tmp_path):  # noqa: F811
    base = ["evaluate", "--images", class_folder, "--model", model_file, "--protocol", "paper", "-o", tmp_path / "r.md"]
    proc = run_in_process(*base, "--explainers", "GuidedGradCam", "--gradcam-layer", "no_such_layer")
    assert_one_line_error(proc, "GuidedGradCam", "no_such_layer")
    assert list(tmp_path.iterdir()) == []


def test_a_source_reads_only_its_batch(tmp_path):
    from jaxpull.files import images as image_io

    paths = image_io.sample_paths()
    source = imagesource.ImageSource(tuple(paths), None, 32, 36)
    assert source.load(slice(1, 3)).shape == (2, 32, 32, 3) and source[0].shape == (32, 32, 3)
    fingerprint = source.fingerprint()
    assert imagesource.ImageSource(tuple(paths), None, 32, 36).fingerprint() == fingerprint
    assert imagesource.ImageSource(tuple(paths), None, 64, 72).fingerprint() != fingerprint
    assert runner.pad(np.arange(3), 5).tolist() == [0, 1, 2, 2, 2] and runner.pad(None, 5) is None
