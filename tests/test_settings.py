"""Settings with one owner: the rule objects and their composite, the Ascent, the named presets, and
one validation used by the API, the sweep, the CLI and the app."""

from __future__ import annotations

import types

import numpy as np
import pytest

import jaxpull
from conftest import images
from jaxpull.core import pullback, settings
from jaxpull.core.rules import Attention, MaxPool, ReLU, Rules
from jaxpull.shell import cli, sweep as S, tasks

X = images(1, 32, seed=3)
NAN, INF = float("nan"), float("inf")


def test_defaults_are_methods_and_presets_print():
    a = settings.Ascent()
    # docs/method.md: steps 5, alpha 20, eps 100, clip to [-1, 1] after every step; target logit
    assert (a.steps, a.alpha, a.eps, a.margin, a.loss, a.relative_alpha, a.project, a.clip, a.normalize_step) == (
        5,
        20.0,
        100.0,
        0.0,
        "logit",
        False,
        True,
        "every",
        True,
    )
    assert settings.resolve_ascent() == a == settings.PRESETS["excitation"].ascent
    semantic = settings.resolve_ascent("semantic")
    assert semantic.eps is None and not semantic.project and semantic.clip == "every" and semantic.steps == 5
    e, s = settings.resolve("excitation"), settings.resolve("semantic")
    assert e.relu == ReLU(temperature=0.3, gate="sigmoid") and e.max_pool == MaxPool(mode="soft", temperature=0.3)
    assert s.relu == ReLU(temperature=0.6, gate="normal_cdf") and s.max_pool == MaxPool("detached", 0.3)
    assert s == Rules().replace(hardswish_temperature=0.6) and settings.DEFAULT_RULES == "excitation"
    assert list(settings.PRESETS) == ["excitation", "semantic", "vanilla", "guided"]
    text = repr(settings.PRESETS["semantic"])
    assert "eps=None" in text and "GELU(mode='gate', temperature=1.0)" in text
    assert set(pullback.LOSS_FUNCTIONS) == set(settings.LOSSES)


BAD_ASCENT = [
    (dict(steps=-3), "steps must be a whole number in [1, 1e+05], got -3"),
    (dict(steps=0), "steps must be a whole number in [1, 1e+05], got 0"),
    (dict(steps=2.5), "steps must be a whole number in [1, 1e+05], got 2.5"),
    (dict(steps=True), "steps must be a whole number in [1, 1e+05], got True"),
    (dict(steps=NAN), "steps must be a whole number"),
    (dict(steps=1e300), "steps must be a whole number in [1, 1e+05], got 1e+300"),
    (dict(steps=3_000_000_000), "steps must be a whole number in [1, 1e+05]"),
    (dict(alpha=0), "alpha must be a positive number up to 1e+06, got 0"),
    (dict(alpha=-1), "alpha must be a positive number"),
    (dict(alpha=NAN), "alpha must be a positive number"),
    (dict(alpha=INF), "alpha must be a positive number"),
    (dict(alpha=1e20), "alpha must be a positive number up to 1e+06, got 1e+20"),
    (dict(eps=-5), "eps must be a positive number up to 1e+06 or None, got -5"),
    (dict(eps=0), "eps must be a positive number"),
    (dict(eps=NAN), "eps must be a positive number"),
    (dict(eps=1e20), "eps must be a positive number up to 1e+06 or None, got 1e+20"),
    (dict(margin=-1), "margin must be a number in [0, 1e+06]"),
    (dict(margin=NAN), "margin must be a number in [0, 1e+06]"),
    (dict(loss="mse"), "unknown loss 'mse': use one of logit, cross_entropy, self_explain"),
    (dict(clip=1), "unknown clip 1: use one of every, last, none"),
    (dict(normalize_step="yes"), "normalize_step must be True or False"),
]
BAD_RULES = [
    (dict(temperature=True), "temperature must be a positive number up to 3.4e+38, got True"),
    (dict(temperature=0), "temperature must be a positive number"),
    (dict(temperature=-1), "temperature must be a positive number"),
    (dict(temperature=NAN), "temperature must be a positive number"),
    (dict(temperature=INF), "temperature must be a positive number"),
    (dict(temperature=1e300), "temperature must be a positive number up to 3.4e+38, got 1e+300"),
    (dict(temperature=1e-50), "got 1e-50"),  # 0 in float32
    (dict(temperature=None), "got None (for the exact derivative use relu='plain')"),
    (dict(temperature="0.3"), "temperature must be a positive number up to 3.4e+38, got '0.3'"),
    (dict(pool_temperature=True), "pool_temperature must be a positive number"),
    (dict(pool_temperature=0), "pool_temperature must be a positive number"),
    (dict(attention_temperature=1e-30), "attention_temperature must be a number in [1e-06, 3.4e+38], got 1e-30"),
    (dict(gate="relu"), "unknown gate 'relu': use one of sigmoid, normal_cdf"),
    (dict(relu=None), "unknown relu None: use one of gate, plain, guided"),
    (dict(max_pool="hard"), "unknown max_pool 'hard': use one of soft, detached, plain"),
    (dict(pool_weights="soft"), "unknown setting(s) pool_weights: use relu, temperature"),
    (dict(rules="paper"), "unknown rules 'paper': use one of excitation, semantic, vanilla, guided"),
    (dict(rules=None), "rules must be a preset name (excitation, semantic, vanilla, guided) or a jaxpull.Rules"),
]


@pytest.mark.parametrize("kwargs,message", BAD_ASCENT + BAD_RULES, ids=lambda v: repr(v)[:40])
def test_bad_settings_are_one_line_errors_from_the_api(tiny_model, kwargs, message):
    with pytest.raises(ValueError) as e:
        jaxpull.ascent(tiny_model, X, [1], **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    if (dict(kwargs), message) in BAD_RULES:
        with pytest.raises(ValueError) as e:
            jaxpull.pullback(tiny_model, X, [1], **kwargs)
        assert message in str(e.value)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(steps=-3), "steps must be a whole number"),
        (dict(alpha=NAN), "alpha must be a positive number"),
        (dict(eps=-5), "eps must be a positive number"),
        (dict(temperatures=[True]), "temperature must be a positive number"),
        (dict(temperature=0.3), "sweep takes temperatures (a list), not temperature"),
        (dict(rules="x"), "unknown rules"),
        (dict(stepz=3), "unknown setting(s) stepz"),
    ],
)
def test_bad_settings_are_errors_from_the_sweep_before_any_output(tiny_model, tmp_path, kwargs, message):
    with pytest.raises(ValueError) as e:
        S.sweep(tiny_model, X, [1, 2], method="ascent", out=tmp_path / "s", progress=False, **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def _cli(capsys, *args):
    """Run the CLI in-process: (exit status, stderr lines)."""
    try:
        rc = cli.main([str(a) for a in args])
    except SystemExit as e:  # argparse's own errors (one line too: jaxpull's parser)
        rc = e.code
    return rc, capsys.readouterr().err.strip().splitlines()


CLI_CASES = [
    (["--steps", "-3"], "steps must be a whole number"),
    (["--steps", "2.5"], "got 2.5"),
    (["--steps", "True"], "'True' is not a number"),
    (["--steps", "nan"], "steps must be a whole number"),
    (["--steps", "1e300"], "steps must be a whole number in [1, 1e+05], got 1e+300"),
    (["--alpha", "0"], "alpha must be a positive number"),
    (["--alpha", "-1"], "alpha must be a positive number"),
    (["--alpha", "nan"], "alpha must be a positive number"),
    (["--alpha", "inf"], "alpha must be a positive number"),
    (["--alpha", "1e300"], "alpha must be a positive number up to 1e+06"),
    (["--eps", "-5"], "eps must be a positive number"),
    (["--eps", "0"], "eps must be a positive number"),
    (["--eps", "nan"], "eps must be a positive number"),
    (["--eps", "1e20"], "eps must be a positive number up to 1e+06"),
    (["--temperature", "True"], "'True' is not a number"),
    (["--temperature", "0"], "temperature must be a positive number"),
    (["--temperature", "-1"], "temperature must be a positive number"),
    (["--temperature", "nan"], "temperature must be a positive number"),
    (["--temperature", "inf"], "temperature must be a positive number"),
    (["--temperature", "1e300"], "temperature must be a positive number up to 3.4e+38"),
    (["--pool-temperature", "-1"], "--pool-temperature must be a positive number"),
    (["--attention-temperature", "1e-30"], "--attention-temperature must be a number in [1e-06"),
    (["--gelu", "none"], "invalid choice: 'none'"),
    (["--clip", "sometimes"], "invalid choice: 'sometimes'"),
    (["--rules", "paper"], "invalid choice: 'paper'"),
]


def test_bad_settings_in_the_cli_exit_2_with_one_line_and_write_nothing(capsys, tmp_path):
    out = tmp_path / "fig.png"
    for flags, message in CLI_CASES:
        rc, err = _cli(capsys, "explain", "missing.jpg", "-o", out, *flags)
        assert rc == 2 and len(err) == 1 and err[0].startswith("jaxpull: error: ") and message in err[0], (flags, err)
    for flags, message in [
        (["--method", "ascent", "--steps=-3"], "steps must be a whole number"),
        (["--alpha", "nan"], "alpha must be a positive number"),
        (["--eps", "-5"], "eps must be a positive number"),
        (["--temperatures", "0.3,-1"], "must be positive"),
        (["--rules", "x"], "invalid choice"),
    ]:
        rc, err = _cli(capsys, "sweep", "missing.jpg", "--out", tmp_path / "s", *flags)
        assert rc == 2 and len(err) == 1 and err[0].startswith("jaxpull: error: ") and message in err[0], (flags, err)
    rc, err = _cli(capsys, "evaluate", "--images", "missing.jpg", "-o", tmp_path / "r.md", "--temperature", "-1")
    assert rc == 2 and len(err) == 1 and "temperature must be a positive number" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_cli_help_shows_the_presets_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["explain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "ascent steps (default 5)" in text
    assert "(default from --rules: excitation 100, semantic none, vanilla 100, guided 100)" in text
    assert "ReLU gate temperature t (default from --rules: excitation 0.3, semantic 0.6, vanilla 0.6" in text
    assert "{excitation,semantic,vanilla,guided}" in text and "--sr-attention {tempered,value_only,plain}" in text


def test_pool_settings_on_a_model_without_max_pools_get_a_note(capsys):
    note = tasks.note_unused_pool_settings
    note({"pool_temperature": 0.2}, types.SimpleNamespace(arch="mobilenet_v2"))
    assert capsys.readouterr().err == "jaxpull: note: --pool-temperature has no effect: mobilenet_v2 has no max-pools\n"
    note({"pool_temperature": 0.2}, types.SimpleNamespace(arch="resnet18"))  # has max-pools: silent
    note({"steps": 3}, types.SimpleNamespace(arch="mobilenet_v2"))  # not given: silent
    assert capsys.readouterr().err == ""


def test_presets_select_the_rules_and_keywords_beat_them(tiny_model):
    x = images(2, 32, seed=4)
    explicit = dict(temperature=0.6, pool_temperature=0.3, gate="normal_cdf", max_pool="detached")
    semantic = np.asarray(jaxpull.pullback(tiny_model, x, [1, 7], rules="semantic"))
    np.testing.assert_array_equal(semantic, jaxpull.pullback(tiny_model, x, [1, 7], **explicit))
    np.testing.assert_array_equal(
        jaxpull.pullback(tiny_model, x, [1, 7], rules="excitation"),
        jaxpull.pullback(tiny_model, x, [1, 7], rules="semantic", temperature=0.3, gate="sigmoid", max_pool="soft"),
    )
    assert not np.allclose(semantic, jaxpull.pullback(tiny_model, x, [1, 7]))
    # an override beats the preset; the rest stays the preset's (dataclasses.replace semantics)
    r = settings.resolve("semantic", temperature=0.5)
    assert r.relu == ReLU(temperature=0.5, gate="normal_cdf") and r.max_pool == MaxPool("detached", 0.3)
    assert r == settings.resolve("semantic").replace(relu=ReLU(temperature=0.5))
    assert settings.resolve(r, attention="value_only").attention == Attention(mode="value_only")
    assert settings.resolve_ascent("semantic", eps=7) == settings.Ascent(eps=7.0)
    # the ascent: semantic is eps None (no projection), clamped every step
    sem = jaxpull.ascent(tiny_model, x, [1], rules="semantic", steps=2)
    np.testing.assert_array_equal(sem, jaxpull.ascent(tiny_model, x, [1], steps=2, eps=None, **explicit))
    assert float(np.abs(sem).max()) <= 1.0
    # a composite takes the default preset's ascent unless one is named
    np.testing.assert_array_equal(
        jaxpull.ascent(tiny_model, x, [1], rules=settings.resolve("semantic"), ascent="semantic", steps=2), sem
    )


def test_new_ascent_settings_do_not_recompile(tiny_model):
    jaxpull.ascent(tiny_model, X, [1], steps=1)
    before = pullback.ascent_core._cache_size()
    jaxpull.ascent(tiny_model, X, [2], steps=3, alpha=5.0, eps=10.0, margin=0.1, temperature=0.9)
    jaxpull.ascent(tiny_model, X, [2], steps=np.int64(2), alpha=np.float32(7))
    assert pullback.ascent_core._cache_size() == before


def test_app_strip_uses_the_pool_temperature(tiny_model, tmp_path):
    from jaxpull.shell import explorer as ex
    from jaxpull.shell.figures import normalize_cell

    jaxpull.save(tiny_model, tmp_path / "r18.safetensors")  # resnet18: has a max-pool
    explorer = ex.Explorer(str(tmp_path), output_dir=str(tmp_path / "out"))
    ts = (0.3, 3.0)
    form = dict(steps=1, alpha=20, eps=100)
    picture, _ = explorer.strip(None, "chelsea", "r18", "0: tench", temperatures=ts, pool_temperature=0.05, **form)
    tiles = picture[18:].reshape(224, 2, 224, 3).transpose(1, 0, 2, 3).astype(int)
    x, _ = explorer.image(None, "chelsea")
    for tile, t in zip(tiles, ts, strict=True):
        d = np.asarray(jaxpull.ascent(tiny_model, x, [0], steps=1, temperature=t, pool_temperature=0.05, output="diff"))
        assert np.abs(tile - (normalize_cell(d[0, 0]) * 255).astype(np.uint8)).max() <= 1
    other, _ = explorer.strip(None, "chelsea", "r18", "0: tench", temperatures=ts, pool_temperature=3.0, **form)
    assert np.abs(other.astype(int) - picture).max() > 10  # the pool temperature changes the strip
