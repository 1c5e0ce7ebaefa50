"""Rules as data: one table of settings, every surface generated from it, every value checked when
the rule is built, and a composite that maps through ``jax.vmap`` via the public API."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpull
from conftest import images
from jaxpull.core import pullback, settings
from jaxpull.core.rules import RULE_FIELDS, SETTINGS, Rule, Rules, settings_table
from jaxpull.core.rules.base import choice, number, validated
from jaxpull.shell import cli, explorer
from jaxpull_convert import torch_reference as R

ROOT = Path(__file__).resolve().parents[1]


def _flags(subcommand: str) -> set:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[subcommand]
    return {opt for action in sub._actions for opt in action.option_strings}


def test_every_setting_has_a_flag_a_form_field_a_manifest_entry_docs_and_a_torch_counterpart(tiny_model, tmp_path):
    """The table drives every surface: a setting missing from any of them fails here."""
    for subcommand in ("explain", "evaluate"):
        flags = _flags(subcommand)
        missing = [n for n in settings.SETTINGS if "--" + n.replace("_", "-") not in flags]
        assert missing == [], (subcommand, missing)
    assert {"--" + n.replace("_", "-") for n in settings.SETTINGS} - _flags("sweep") == {"--temperature"}
    assert set(explorer.FORM) == set(settings.SETTINGS)  # the app's controls
    from jaxpull.shell import sweep as S

    S.sweep(tiny_model, images(1, 32), [1], out=tmp_path / "s", progress=False)
    import json

    config = json.loads((tmp_path / "s" / "manifest.json").read_text())["config"]
    assert set(config["rule_settings"][0]) == set(SETTINGS) and set(config["ascent"]) == set(settings.ASCENT_SETTINGS)
    assert set(R.SWAPS) == set(RULE_FIELDS)  # every rule has its torch reference
    method = (ROOT / "docs" / "method.md").read_text()
    undocumented = [n for n in settings.SETTINGS if f"`{n}`" not in method]
    assert undocumented == []


@pytest.mark.parametrize("name", [n for n, s in settings.SETTINGS.items() if s.kind == "number"])
def test_every_number_setting_refuses_bad_values_at_construction(name):
    s = settings.SETTINGS[name]
    bad = [float("nan"), float("inf"), -1.0, 1e300, True, "1", [1.0, "x"]]
    if not s.field.metadata["optional"]:
        bad.append(None)
    if s.field.metadata["low"] > 0:
        bad.append(0.0)
    for value in bad:
        with pytest.raises(ValueError) as e:
            settings.resolve_both(**{name: value})
        message = str(e.value)
        assert message.startswith(f"{name} must be ") and "\n" not in message, message
        assert re.search(r"(positive number up to|number in \[)", message), message  # the allowed range


@pytest.mark.parametrize("name", [n for n, s in settings.SETTINGS.items() if s.kind != "number"])
def test_every_choice_setting_refuses_unknown_values_at_construction(name):
    s = settings.SETTINGS[name]
    for value in ("no such value", None, 3):
        with pytest.raises(ValueError) as e:
            settings.resolve_both(**{name: value})
        message = str(e.value)
        assert name in message and "\n" not in message, message
        if s.kind == "choice":
            assert "use one of " + ", ".join(s.choices) in message


def test_vmap_over_a_composite_with_array_temperatures_compiles_once(tiny_model):
    """The public API maps over a Rules whose temperature leaves are arrays (``batch_axes``): one
    compile serves every temperature, and each slice equals its own pullback."""
    x = images(1, 32, seed=5)
    ts = np.array([0.1, 0.3, 1.0], np.float32)
    many = jaxpull.resolve("excitation", temperature=ts, pool_temperature=ts)
    run = jax.jit(jax.vmap(lambda r: jaxpull.pullback(tiny_model, x, [3], rules=r), in_axes=(many.batch_axes(),)))
    maps = run(many)
    before = pullback.pullback_core._cache_size()
    for i, t in enumerate(ts):
        one = jaxpull.pullback(tiny_model, x, [3], temperature=float(t), pool_temperature=float(t))
        np.testing.assert_allclose(maps[i], one, rtol=1e-4, atol=1e-5 * float(jnp.abs(one).max()))  # batched rounding
    assert pullback.pullback_core._cache_size() == before + 1  # the three single calls: one compile
    run(jaxpull.resolve("excitation", temperature=ts * 2, pool_temperature=ts))  # new temperatures: no retrace
    assert run._cache_size() == 1


def test_rules_print_compare_and_record():
    r = settings.resolve("excitation")
    assert repr(r).startswith("Rules(relu=ReLU(mode='gate', temperature=0.3, gate='sigmoid'), max_pool=MaxPool(")
    assert r == settings.resolve("excitation") and r != settings.resolve("semantic")
    record = settings.record(r, settings.resolve_ascent(), "excitation")
    assert record["rules"] == "excitation" and record["temperature"] == 0.3 and record["eps"] == 100.0
    assert set(record) == {"rules", *settings.SETTINGS}
    leaves = jax.tree.leaves(r)
    assert len(leaves) == 7 and all(np.asarray(v).dtype == np.float32 for v in leaves)  # the temperatures, traced


def test_a_new_rule_is_one_class_and_a_field():
    """A mock rule (Softplus, ``z * s(z)`` style) added to a composite gets its settings, flags and
    form fields generated with no other change: what a contributor writes for a new rule."""

    @validated
    class Softplus(Rule):
        mode: str = choice("gate", {"gate": "g * sigmoid(z / t)", "plain": "the exact derivative"}, "Softplus")
        temperature: float = number(1.0, "Softplus gate temperature")

    @validated
    class MoreRules(Rules):
        softplus: Softplus = dataclasses.field(default_factory=Softplus, metadata=dict(doc="Softplus", names={}))

    table = settings_table(MoreRules)
    assert list(table)[-2:] == ["softplus", "softplus_temperature"] and set(SETTINGS) < set(table)
    parser = argparse.ArgumentParser()
    cli._add_settings(parser, table=table)
    args = parser.parse_args(["--softplus", "plain", "--softplus-temperature", "0.5"])
    assert (args.softplus, args.softplus_temperature) == ("plain", 0.5)
    with pytest.raises(ValueError, match="Softplus.temperature must be a positive number"):
        MoreRules(softplus=Softplus(temperature=-2.0))
    assert jax.tree.leaves(MoreRules())[-1] == np.float32(1.0)


def test_no_module_cites_a_spec_outside_the_repository():
    outside = "METHOD" + ".md"  # the method's spec is docs/method.md, in this repository
    cited = [
        str(p.relative_to(ROOT))
        for folder in ("jaxpull", "convert", "tests", "benchmarks", "notebooks")
        for p in (ROOT / folder).rglob("*")
        if p.suffix in (".py", ".ipynb") and outside in p.read_text()
    ]
    assert cited == [] and outside not in (ROOT / "README.md").read_text()


def test_family_declarations_are_typed():
    """Each family file declares one Family value: a misspelt fact or one of the wrong kind fails
    when the module is imported, instead of silently falling back to a default."""
    from jaxpull.core import models
    from jaxpull.core.models import resnet
    from jaxpull.core.models.family import Family

    with pytest.raises(TypeError, match="max_pool"):
        Family(architectures=resnet.ARCHITECTURES, torch_layout=resnet.torch_layout, classifier="fc", max_pool=True)
    with pytest.raises(TypeError, match="Family.preprocessing must be a Preprocessing"):
        Family(
            architectures=resnet.ARCHITECTURES,
            torch_layout=resnet.torch_layout,
            max_pools=True,
            classifier="fc",
            preprocessing=224,
        )
    with pytest.raises(TypeError, match="Family.max_pools must be True or False"):
        Family(architectures=resnet.ARCHITECTURES, torch_layout=resnet.torch_layout, max_pools="yes", classifier="fc")
    assert models.get("resnet50").max_pools and not models.get("vit_b_16").max_pools
    assert models.get("inception_v3").preprocessing.crop_size == 299 and models.get("googlenet").transform_input
