"""``jaxpull.evaluation.pipeline`` and the ``jaxpull evaluate`` command: the quick protocol, image
folders and their class names, resuming, and bad input.

The tests run a random one-layer ViT for 32-pixel images (the command's: with ImageNet's 1000
classes and names), so every metric compiles and runs in seconds: at 32 pixels, randomly
initialised torchvision CNNs give nearly the same logits for every image (mnasnet0_5: a standard
deviation of 4e-7 across images), and this ViT does not. The paper's protocol is in
test_evaluate_paper.py.
"""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

from conftest import images
from helpers import assert_one_line_error, run, run_in_process
from jaxpull.evaluation import imagesource, pipeline, protocol as protocols, runner
from jaxpull.evaluation.imagenet_wnids import WNIDS
from jaxpull.evaluation.imagesource import ArraySource

# less codegen effort: every function compiles once and runs on a few 32-pixel images (conftest.py)
pytestmark = pytest.mark.quick_compile

# ImageNet classes of the photos: tabby (chelsea), coffee mug (coffee), space shuttle (rocket)
PHOTO_CLASSES = {"chelsea": ("n02123045", 281), "coffee": ("n03063599", 504), "rocket": ("n04266014", 812)}


def tiny_vit(size: int = 32, num_classes: int = 1000, patch: int = 8):
    """A one-layer ViT for ``size``-pixel images, random (with a random head: torchvision's is
    zero), converted: its logits depend on the image, and every metric compiles in seconds."""
    import torch
    from torchvision.models.vision_transformer import VisionTransformer

    import jaxpull_convert

    torch.manual_seed(0)
    tm = VisionTransformer(size, patch, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=num_classes)
    torch.nn.init.normal_(tm.heads.head.weight)
    return jaxpull_convert.from_torch_module("vit_b_16", tm.eval())


def small_model_file(path, size: int = 32, resize: int = 0, patch: int = 8):
    """:func:`tiny_vit` with ImageNet's 1000 classes and names, saved with a ``size``-pixel input."""
    import jaxpull
    from jaxpull.core.preprocessing import Preprocessing

    model = tiny_vit(size, patch=patch)
    spec = dataclasses.replace(model.spec, preprocessing=Preprocessing(size, resize or size + size // 8))
    jaxpull.save(type(model)(model.params, spec), path)
    return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return small_model_file(tmp_path_factory.mktemp("m") / "vit.safetensors")


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory):
    """An ImageNet-style folder holding three of the 1000 classes, by their WordNet ids."""
    from jaxpull.files import images as image_io

    root = tmp_path_factory.mktemp("val")
    for name, (wnid, _) in PHOTO_CLASSES.items():
        (root / wnid).mkdir()
        shutil.copy(image_io.sample_paths([name])[0], root / wnid / f"{name}.png")
    return root


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


def test_class_folders_are_found_class_by_class(tmp_path):
    from jaxpull.files import images as image_io

    photos = image_io.sample_paths(["chelsea", "coffee", "rocket"])
    for folder, photo in zip(["n03", "n01", "n02"], photos, strict=True):
        (tmp_path / folder).mkdir()
        shutil.copy(photo, tmp_path / folder / f"a{photo.suffix}")
        shutil.copy(photo, tmp_path / folder / f"b{photo.suffix}")
    (tmp_path / "n01" / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()  # no images: not a class
    paths, folders = pipeline.find_images([tmp_path])
    assert folders == ["n01", "n02", "n03"] * 2  # classes in turn
    assert [p.parent.name for p in paths] == folders and [p.stem for p in paths[:3]] == ["a"] * 3
    assert pipeline.find_images([tmp_path], limit=4)[1] == ["n01", "n02", "n03", "n01"]
    files, none = pipeline.find_images(photos)
    assert files == photos and none is None
    with pytest.raises(ValueError, match="does not exist"):
        pipeline.find_images([tmp_path / "nope"])
    with pytest.raises(ValueError, match="no images found"):
        pipeline.find_images([tmp_path / "empty"])


def test_folder_names_map_to_the_models_classes():
    """WordNet ids, class names and indices name a class of the model whatever the other folders
    are (issue 33: a subset of ImageNet's folders was scored as classes 0, 1, 2)."""
    from jaxpull_convert.imagenet_classes import IMAGENET_CLASSES

    names = IMAGENET_CLASSES
    assert len(WNIDS) == 1000 and WNIDS == tuple(sorted(WNIDS)) and WNIDS[0] == "n01440764"
    wnids = [w for w, _ in PHOTO_CLASSES.values()]
    got = imagesource.folder_classes(wnids + wnids[:1], 1000, names)
    assert got.tolist() == [i for _, i in PHOTO_CLASSES.values()] + [281]
    assert names[281] == "tabby" and names[504] == "coffee mug" and names[812] == "space shuttle"
    # class names (exact, or case-insensitive where unique) and indices
    assert imagesource.folder_classes(["tabby", "Coffee Mug", "7", "Cardigan", "cardigan"], 1000, names).tolist() == [
        281,
        504,
        7,
        264,
        474,
    ]
    # a complete set of folders with other names: ImageFolder's sorted numbering
    assert imagesource.folder_classes(["b", "a", "c", "a"], 3).tolist() == [1, 0, 2, 0]
    bad = [
        (["n02123045", "cats"], 1000, names, "class folder 'cats' is not a class of the model (1 of 2"),
        (["n02123045"], 10, (), "is a WordNet id, but the model has 10 classes"),
        (["n00000001"], 1000, names, "not one of ImageNet-1k's 1000 WordNet ids"),
        (["CARDIGAN"], 1000, names, "matches 2 class names of the model (indices 264, 474)"),
        (["a", "b"], 3, (), "class folder 'a' is not a class of the model (2 of 2 folders unknown)"),
        (["0", "12"], 10, (), "class folder '12' is not a class"),
    ]
    for folders, classes, class_names, fragment in bad:
        with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")) as e:
            imagesource.folder_classes(folders, classes, class_names)
        assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def small_model():
    return tiny_vit(32, 10)


def test_evaluate_report(small_model):
    x = images(6, 32)
    kw = dict(
        explainer_names=["pullback", "gradient"],
        metric_names=["focus", "faithfulness", "randomization"],
        mosaics=5,
        stages=2,
        batch=4,  # two batches, the second padded
        progress=False,
    )
    report = pipeline.evaluate(small_model, x, [0, 1, 2, 0, 1, 2], **kw)
    assert set(report.scores) == {"focus", "faithfulness", "randomization"}
    assert report.scores["focus"]["gradient"].shape == (5,) and report.scores["faithfulness"]["pullback"].shape == (6,)
    assert report.curves["pullback"].shape == (2, 6) and len(report.stage_names) == 2
    rows = pipeline.summary_rows(report, 200)
    assert len(rows) == 6 and all(np.isnan(r["diff"]) for r in rows if r["explainer"] == "gradient")
    text = pipeline.to_markdown(report, rows, "jaxpull evaluate ...")
    assert "## focus (higher is better)" in text and "| pullback | 5 |" in text and "Sanity verdict" in text
    assert "4x4 grid of patches (set to 0.0)" in text
    csv = pipeline.to_csv(rows).splitlines()
    assert csv[0].startswith("metric,explainer,n,mean,ci_low,ci_high,diff") and len(csv) == 7
    # one batch of all six images: the same per-image scores up to float32 rounding (the padding of
    # the second batch changes nothing); a rerun reproduces them: test_a_killed_run_resumes_where_it_stopped
    one = dict(kw, batch=6, explainer_names=["pullback"], metric_names=["faithfulness"])
    whole = pipeline.evaluate(small_model, x, [0, 1, 2, 0, 1, 2], **one)
    np.testing.assert_allclose(
        whole.scores["faithfulness"]["pullback"], report.scores["faithfulness"]["pullback"], rtol=1e-5
    )
    with pytest.raises(ValueError, match="unknown metric of the quick protocol 'accuracy'"):
        pipeline.evaluate(small_model, x, metric_names=["accuracy"])
    with pytest.raises(ValueError, match="options given for explainers not chosen"):
        pipeline.evaluate(small_model, x, explainer_names=["gradient"], options={"pullback": {"temperature": 1.0}})
    with pytest.raises(ValueError, match=r"explainer gradient: unknown setting\(s\) steps: use relu"):
        pipeline.evaluate(small_model, x, explainer_names=["gradient"], options={"gradient": {"steps": 3}})
    # an explainer that cannot run: an error naming it, or with drop_unavailable (the command's
    # default list) left out and named in the report
    bad = protocols.ExplainerSpec("pullback", {"temperature": -1.0})
    good = protocols.ExplainerSpec("gradient", {})
    with pytest.raises(ValueError, match="explainer pullback: temperature must be"):
        pipeline.run_evaluation(small_model, ArraySource(x), None, [good, bad], metric_names=["faithfulness"])
    kept = pipeline.run_evaluation(
        small_model, ArraySource(x), None, [good, bad], metric_names=["faithfulness"], drop_unavailable=True
    )
    assert list(kept.scores["faithfulness"]) == ["gradient"] and "temperature" in kept.settings["dropped"]["pullback"]


def test_a_killed_run_resumes_where_it_stopped(small_model, tmp_path, monkeypatch):
    """Units written before an interruption are not computed again, and the resumed result equals
    an uninterrupted run's; other settings are refused before any compute."""
    x = images(6, 32)
    labels = [0, 1, 2, 0, 1, 2]
    kw = dict(explainer_names=["pullback", "gradient"], metric_names=["faithfulness", "focus"], mosaics=4)
    kw.update(batch=2, progress=False)
    whole = pipeline.evaluate(small_model, x, labels, **kw)
    work = tmp_path / "work"
    calls, stop = [], [5]
    score = runner._score

    def interrupted(job, metric, batch):
        calls.append(metric)
        if len(calls) == stop[0]:
            raise RuntimeError("killed")  # mid-way through the fifth unit
        return score(job, metric, batch)

    monkeypatch.setattr(runner, "_score", interrupted)
    with pytest.raises(RuntimeError, match="killed"):
        pipeline.evaluate(small_model, x, labels, work=work, **kw)
    stop[0] = 0
    assert len(list(work.rglob("images-*.npz"))) == 4 and (work / "manifest.json").is_file()
    calls.clear()
    resumed = pipeline.evaluate(small_model, x, labels, work=work, **kw)
    # 3 batches x 2 explainers of images, 2 batches x 2 of mosaics; 4 image units were done
    assert len(calls) == 2 + 4 and len(list(work.rglob("*.npz"))) == 10
    for metric in ("faithfulness", "focus"):
        for name in ("pullback", "gradient"):
            np.testing.assert_array_equal(resumed.scores[metric][name], whole.scores[metric][name])
    calls.clear()
    more = pipeline.evaluate(
        small_model, x, labels, work=work, **{**kw, "metric_names": ["faithfulness", "infidelity"]}
    )
    assert calls == ["infidelity"] * 6  # only the new metric
    np.testing.assert_array_equal(more.scores["faithfulness"]["gradient"], whole.scores["faithfulness"]["gradient"])
    with pytest.raises(ValueError, match=r"holds an evaluation with other settings \(labels, seed differ\)"):
        pipeline.evaluate(small_model, x, [1, 1, 2, 0, 1, 2], work=work, seed=1, **kw)
    with pytest.raises(ValueError, match="not empty and holds no evaluation"):
        pipeline.evaluate(small_model, x, labels, work=tmp_path, **kw)


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
    assert "`pullback`: {'rules': 'excitation'}" in text  # jaxpull's default preset
    # each image is scored for its folder's class, not the folder's position (issue 33)
    assert "n02123045/chelsea.png (281 tabby)" in text and "n04266014/rocket.png (812 space shuttle)" in text
    assert (tmp_path / "report.csv").read_text().count("\n") == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.csv", "report.md"]  # the work directory is gone


def test_mosaics_use_the_labels_the_run_scores(model_file, class_folder, tmp_path):
    """With top-1 labels, the Focus mosaics' targets are top-1 labels, not folder positions (issue 33)."""
    from jaxpull.files import cache

    model = cache.resolve(str(model_file))
    paths, folders = imagesource.find_images([class_folder])
    source = imagesource.ImageSource(tuple(paths), tuple(folders), 32, 36)
    top = runner.top1(model, source)
    spec = protocols.ExplainerSpec("gradient", {})
    for proto, labels in (("paper", None), ("paper", np.array([7, 8, 9])), ("quick", np.array([7, 8, 9]))):
        report = pipeline.run_evaluation(
            model, source, labels, [spec], protocol=proto, metric_names=["focus"], mosaics=6, progress=False
        )
        used = top if labels is None else labels
        assert set(report.settings["mosaic_targets"]) <= set(used.tolist())
        assert report.settings["labels_used"] == used.tolist()


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory):
    """A ViT that takes 96-pixel images only (its position embeddings fix the size)."""
    return small_model_file(tmp_path_factory.mktemp("vit") / "vit96.safetensors", 96, 96, patch=32)


def test_randomization_probes_a_fixed_size_model_at_its_own_size(vit_file, class_folder, tmp_path):
    """Issue 33, 16: the layer probe ran at 64 pixels, which a 224-pixel (here 96) ViT refuses."""
    out = tmp_path / "r.md"
    args = ["--images", class_folder, "--model", vit_file, "--explainers", "gradient", "--stages", 2]
    proc = run_in_process("evaluate", *args, "--metrics", "randomization", "--labels", "0,1,2", "-o", out)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert "## Cascading randomisation" in text and "| gradient | 3 |" in text and "nan" not in text


def test_evaluate_command_bad_input(model_file, class_folder, tmp_path):
    out = tmp_path / "r.md"
    base = ["--model", model_file, "-o", out]
    odd = small_model_file(tmp_path.parent / "odd.safetensors", size=33, patch=11)
    cases = [
        (["--images", class_folder, "--explainers", "lime"], "unknown explainer 'lime'"),
        (["--images", class_folder, "--metrics", "accuracy"], "unknown metric of the quick protocol 'accuracy'"),
        (["--images", class_folder, "--protocol", "paper", "--metrics", "faithfulness"], "of the paper protocol"),
        (["--images", class_folder, "--mosaics", "0"], "--mosaics must be a positive integer"),
        (["--images", class_folder, "--samples", "0"], "--samples must be a positive integer"),
        (["--images", class_folder, "--batch-size", "0"], "--batch-size must be a positive integer"),
        (["--images", tmp_path / "missing"], "does not exist"),
        (["--images", class_folder / "n02123045" / "chelsea.png", "--labels", "folders"], "--labels folders needs"),
        # a random network calls every photo the same class: too few classes for mosaics
        (
            ["--images", class_folder / "n02123045" / "chelsea.png", class_folder / "n03063599" / "coffee.png"],
            "at least 3 distinct classes",
        ),
        (["--images", class_folder, "--temperature", "-1"], "--temperature must be a positive number"),
        (["--images", class_folder, "--labels", "1,2"], "--labels gives 2 labels for 3 images"),
        (["--images", class_folder, "--gradcam-layer", "layer4"], "no GradCAM explainer is chosen"),
        (["--images", class_folder, "--protocol", "paper", "--sensitivity-samples", "3"], "the quick protocol's"),
        (["--images", class_folder, "--focus-images", "distinct"], "use it with --protocol paper"),
        (
            ["--images", class_folder, "--protocol", "paper", "--metrics", "focus", "--model", odd],
            "Focus mosaics need square images of an even size",
        ),
        (["--images", class_folder, "--metrics", "faithfulness", "--model", odd], "does not split into a 4x4 grid"),
        (
            ["--images", class_folder, "--protocol", "paper", "--metrics", "infidelity", "--model", odd],
            "must divide the 33x33 image",
        ),
        (
            ["--images", class_folder, "--protocol", "paper", "--focus-images", "distinct", "--labels", "folders"],
            "needs two images of every class",
        ),
    ]
    for i, (args, fragment) in enumerate(cases):  # the first as a real process, the others in this one
        proc = (run if i == 0 else run_in_process)("evaluate", *base, *args)  # the case's --model wins
        assert_one_line_error(proc, fragment)
    assert list(tmp_path.iterdir()) == []  # nothing written, no work directory
    proc = run_in_process("evaluate", "--images", class_folder, "--model", model_file, "-o", tmp_path / "r.txt")
    assert_one_line_error(proc, "must end in .md")
    renamed = tmp_path / "val"
    shutil.copytree(class_folder, renamed)
    shutil.move(renamed / "n03063599", renamed / "mugs")
    proc = run_in_process("evaluate", "--images", renamed, "--labels", "folders", *base)
    assert_one_line_error(proc, "class folder 'mugs' is not a class of the model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val"]
