"""Settings with one owner: the Ascent object, the two rule presets, and one validation of settings
used by the API, the sweep, the CLI and the app."""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest

import jaxpull
from jaxpull.shell import cli, tasks
from jaxpull.core import pullback, settings
from jaxpull.shell import sweep as S
from jaxpull.core.gates import Gating
from conftest import images

X = images(1, 32, seed=3)
NAN, INF = float("nan"), float("inf")


def test_defaults_are_methods_and_presets_print():
    a = settings.Ascent()
    # METHOD.md: steps 5, alpha 20, eps 100, clip to [-1, 1] after every step; target logit
    assert (a.steps, a.alpha, a.eps, a.margin, a.loss, a.relative_alpha, a.project, a.clip) == (
        5,
        20.0,
        100.0,
        0.0,
        "logit",
        False,
        True,
        True,
    )
    assert settings.make_ascent() == a == settings.PRESETS["excitation"].ascent
    semantic = settings.make_ascent(rules="semantic")
    assert semantic.eps is None and not semantic.project and semantic.clip and semantic.steps == 5
    e, s = settings.PRESETS["excitation"], settings.PRESETS["semantic"]
    assert (e.gate, e.temperature, e.pool_temperature, e.pool_weights) == ("sigmoid", 0.3, None, "soft")
    assert (s.gate, s.temperature, s.pool_temperature, s.pool_weights) == ("normal_cdf", 0.6, 0.3, "detached")
    assert settings.DEFAULT_RULES == "excitation"
    assert "eps=None" in repr(s) and "project=False" in repr(s) and "gelu_temperature=1.0" in repr(s)
    assert set(pullback.LOSS_FUNCTIONS) == set(settings.LOSSES)
    g = settings.make_gating(rules="excitation")
    assert float(g.temperature) == float(g.pool_temperature) == np.float32(0.3)


BAD_ASCENT = [
    (dict(steps=-3), "steps must be a whole number >= 0"),
    (dict(steps=2.5), "steps must be a whole number >= 0, got 2.5"),
    (dict(steps=True), "steps must be a number, got True"),
    (dict(steps=NAN), "steps must be a whole number"),
    (dict(alpha=0), "alpha must be positive and finite"),
    (dict(alpha=-1), "alpha must be positive and finite"),
    (dict(alpha=NAN), "alpha must be positive and finite"),
    (dict(alpha=INF), "alpha must be positive and finite"),
    (dict(eps=-5), "eps must be positive and finite, got -5 (or None for no projection)"),
    (dict(eps=0), "eps must be positive and finite"),
    (dict(eps=NAN), "eps must be positive and finite"),
    (dict(margin=-1), "margin must be finite and >= 0"),
    (dict(margin=NAN), "margin must be finite and >= 0"),
    (dict(loss="mse"), "unknown loss 'mse': use one of logit, cross_entropy, self_explain"),
    (dict(clip=1), "clip must be True or False"),
]
BAD_GATES = [
    (dict(temperature=True), "temperature must be a number, got True"),
    (dict(temperature=0), "temperature must be positive and finite"),
    (dict(temperature=-1), "temperature must be positive and finite"),
    (dict(temperature=NAN), "temperature must be positive and finite"),
    (dict(temperature=INF), "temperature must be positive and finite"),
    (dict(pool_temperature=True), "pool_temperature must be a number"),
    (dict(pool_temperature=0), "pool_temperature must be positive"),
    (dict(rules="paper"), "unknown rules 'paper': use one of excitation, semantic"),
    (dict(rules=None), "unknown rules None"),
]


@pytest.mark.parametrize("kwargs,message", BAD_ASCENT + BAD_GATES, ids=lambda v: repr(v)[:40])
def test_bad_settings_are_one_line_errors_from_the_api(tiny_model, kwargs, message):
    with pytest.raises(ValueError) as e:
        jaxpull.ascent(tiny_model, X, [1], **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)
    if set(kwargs) <= {"temperature", "pool_temperature", "rules"}:
        with pytest.raises(ValueError) as e:
            jaxpull.pullback(tiny_model, X, [1], **kwargs)
        assert message in str(e.value)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(steps=-3), "steps must be a whole number"),
        (dict(alpha=NAN), "alpha must be positive"),
        (dict(eps=-5), "eps must be positive"),
        (dict(temperatures=[True]), "temperature must be a number"),
        (dict(rules="x"), "unknown rules"),
        (dict(stepz=3), "unknown ascent option(s) stepz"),
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
    (["--alpha", "0"], "alpha must be positive"),
    (["--alpha", "-1"], "alpha must be positive"),
    (["--alpha", "nan"], "alpha must be positive"),
    (["--alpha", "inf"], "alpha must be positive"),
    (["--eps", "-5"], "eps must be positive"),
    (["--eps", "0"], "eps must be positive"),
    (["--eps", "nan"], "eps must be positive"),
    (["--temperature", "True"], "'True' is not a number"),
    (["--temperature", "0"], "temperature must be positive"),
    (["--temperature", "-1"], "temperature must be positive"),
    (["--temperature", "nan"], "temperature must be positive"),
    (["--temperature", "inf"], "temperature must be positive"),
    (["--pool-temperature", "-1"], "pool_temperature must be positive"),
    (["--rules", "paper"], "invalid choice: 'paper'"),
]


def test_bad_settings_in_the_cli_exit_2_with_one_line_and_write_nothing(capsys, tmp_path):
    out = tmp_path / "fig.png"
    for flags, message in CLI_CASES:
        rc, err = _cli(capsys, "explain", "missing.jpg", "-o", out, *flags)
        assert rc == 2 and len(err) == 1 and err[0].startswith("jaxpull: error: ") and message in err[0], (flags, err)
    for flags, message in [
        (["--method", "ascent", "--steps=-3"], "steps must be a whole number"),
        (["--alpha", "nan"], "alpha must be positive"),
        (["--eps", "-5"], "eps must be positive"),
        (["--temperatures", "0.3,-1"], "must be positive"),
        (["--rules", "x"], "invalid choice"),
    ]:
        rc, err = _cli(capsys, "sweep", "missing.jpg", "--out", tmp_path / "s", *flags)
        assert rc == 2 and len(err) == 1 and err[0].startswith("jaxpull: error: ") and message in err[0], (flags, err)
    rc, err = _cli(capsys, "evaluate", "--images", "missing.jpg", "-o", tmp_path / "r.md", "--temperature", "-1")
    assert rc == 2 and len(err) == 1 and "temperature must be positive" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_cli_help_shows_the_presets_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["explain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "ascent steps (default 5)" in text and "(default from --rules: excitation 100.0, semantic none)" in text
    assert "(default from --rules: excitation 0.3, semantic 0.6)" in text and "{excitation,semantic}" in text


def test_pool_settings_on_a_model_without_max_pools_get_a_note(capsys):
    note = tasks.note_unused_pool_settings
    note({"pool_temperature": 0.2}, types.SimpleNamespace(arch="mobilenet_v2"))
    assert capsys.readouterr().err == "jaxpull: note: --pool-temperature has no effect: mobilenet_v2 has no max-pools\n"
    note({"pool_temperature": 0.2}, types.SimpleNamespace(arch="resnet18"))  # has max-pools: silent
    note({"steps": 3}, types.SimpleNamespace(arch="mobilenet_v2"))  # not given: silent
    assert capsys.readouterr().err == ""


def test_presets_select_the_gates_and_keywords_beat_them(tiny_model):
    x = images(2, 32, seed=4)
    explicit = dict(temperature=0.6, pool_temperature=0.3, gate="normal_cdf", pool_weights="detached")
    semantic = np.asarray(jaxpull.pullback(tiny_model, x, [1, 7], rules="semantic"))
    np.testing.assert_array_equal(semantic, jaxpull.pullback(tiny_model, x, [1, 7], **explicit))
    np.testing.assert_array_equal(
        jaxpull.pullback(tiny_model, x, [1, 7], rules="excitation"),
        jaxpull.pullback(tiny_model, x, [1, 7], temperature=0.3, gate="sigmoid"),
    )
    assert not np.allclose(semantic, jaxpull.pullback(tiny_model, x, [1, 7]))
    # an explicit keyword beats the preset; the rest stays the preset's
    g = settings.make_gating(temperature=0.5, rules="semantic")
    assert (float(g.temperature), float(g.pool_temperature), g.gate) == (0.5, np.float32(0.3), "normal_cdf")
    assert settings.make_gating(temperature=None, rules="semantic") == Gating(
        gate="normal_cdf", pool_weights="detached"
    )
    assert settings.make_ascent(eps=7, rules="semantic") == dataclasses.replace(settings.Ascent(), eps=7.0)
    # the ascent: semantic is eps None (no projection), clamped every step
    sem = jaxpull.ascent(tiny_model, x, [1], rules="semantic", steps=2)
    np.testing.assert_array_equal(sem, jaxpull.ascent(tiny_model, x, [1], steps=2, eps=None, **explicit))
    assert float(np.abs(sem).max()) <= 1.0


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
    picture, _ = explorer.strip(None, "chelsea", "r18", "0: tench", 1, 20, 100, 0.05, temperatures=ts)
    tiles = picture[18:].reshape(224, 2, 224, 3).transpose(1, 0, 2, 3).astype(int)
    x, _ = explorer.image(None, "chelsea")
    for tile, t in zip(tiles, ts):
        d = np.asarray(jaxpull.ascent(tiny_model, x, [0], steps=1, temperature=t, pool_temperature=0.05, output="diff"))
        assert np.abs(tile - (normalize_cell(d[0, 0]) * 255).astype(np.uint8)).max() <= 1
    same_t, _ = explorer.strip(None, "chelsea", "r18", "0: tench", 1, 20, 100, None, temperatures=ts)
    assert np.abs(same_t.astype(int) - picture).max() > 10  # the pool temperature changes the strip
