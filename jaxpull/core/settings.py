"""The settings of an explanation: the backward rules, the ascent, and the named presets of both.

* :class:`~jaxpull.core.rules.Rules`: the backward rule of every layer kind (:mod:`jaxpull.core.rules`);
* :class:`Ascent`: the projected gradient ascent of ``docs/method.md``;
* :data:`PRESETS`: named pairs of the two, the paper's versions and the baselines:
  ``"excitation"`` (the default), ``"semantic"``, ``"vanilla"`` (the exact gradient) and ``"guided"``
  (Guided Backprop).

Every entry point takes ``rules: Rules | str`` (a composite, or a preset's name) and flat keyword
overrides (:data:`SETTINGS`: the rules' ``temperature``, ``gelu``, ... and the ascent's ``steps``,
``alpha``, ...) with ``dataclasses.replace`` semantics; :func:`resolve` and :func:`resolve_ascent`
build what the cores take, and check every value when they build it. The command line's flags, the
app's controls and the sweep's manifest are generated from :data:`SETTINGS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxpull.core.rules import (
    GELU,
    SETTINGS as RULE_SETTINGS,
    Attention,
    Hardswish,
    LayerNorm,
    MaxPool,
    ReLU,
    Rules,
    SiLU,
)
from jaxpull.core.rules.base import Setting, Validated, choice, flag, number, validated

LOSSES = {
    "logit": "the target logit",
    "cross_entropy": "the negative cross-entropy of the target",
    "self_explain": "0.5 * ||logits||^2 (targets ignored)",
}
CLIPS = {
    "every": "clamp to [-1 - margin, 1 + margin] after every step",
    "last": "clamp after the last step only",
    "none": "never clamp",
}
# Ascent bounds: beyond them float32 overflows (alpha 1e20 with eps 100: ||x - x0||^2 becomes inf and
# the projection returns x0; eps^2 overflows from 1.8e19), and the image space is only about 800 wide
# in L2 (224 x 224 x 3 values in [-1, 1]), so larger steps, balls and margins mean nothing more.
MAX_STEP = 1e6
MAX_STEPS = 100_000


@validated
class Ascent(Validated):
    """The projected gradient ascent (``docs/method.md``, "Ascent"); defaults are the first version's.

    Each of ``steps`` steps: g = gated gradient of the loss; x <- x + alpha * g / ||g||_2 (times
    ||x||_2 with ``relative_alpha``; ``alpha * g`` without ``normalize_step``); if ``eps`` is set,
    project x - x0 onto the L2 ball of radius ``eps``; clamp to [-1 - margin, 1 + margin] after every
    step, after the last only, or never (``clip``). Numbers are traced (a new value never
    recompiles), choices static.
    """

    steps: int = number(5, "ascent steps", low=1, high=MAX_STEPS, integer=True)
    alpha: float = number(20.0, "ascent step size", high=MAX_STEP)
    eps: float | None = number(
        100.0, "L2 ball radius around the image (none: no projection)", high=MAX_STEP, optional=True
    )
    margin: float = number(0.0, "slack of the clamp box [-1 - margin, 1 + margin]", low=0.0, high=MAX_STEP)
    loss: str = choice("logit", LOSSES, "ascent objective")
    relative_alpha: bool = flag(False, "step alpha * ||x||_2 instead of alpha")
    clip: str = choice("every", CLIPS, "clamping")
    normalize_step: bool = flag(True, "normalised steps alpha * g / ||g||_2 (off: alpha * g)")

    @property
    def project(self) -> bool:
        """Whether x - x0 is projected onto the L2 ball (``eps`` is set)."""
        return self.eps is not None


class Preset(NamedTuple):
    """A named rule set and its ascent settings."""

    name: str
    description: str
    rules: Rules
    ascent: Ascent


_PLAIN = Rules(
    relu=ReLU(mode="plain"),
    max_pool=MaxPool(mode="plain"),
    hardswish=Hardswish(mode="plain"),
    gelu=GELU(mode="plain"),
    silu=SiLU(mode="plain"),
    layer_norm=LayerNorm(mode="plain"),
    attention=Attention(mode="plain"),
    sr_attention=Attention(mode="plain"),
)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "excitation",
            "the paper's first version (arXiv 2507.22832 v1): sigmoid gate t 0.3, soft max-pool weights tp 0.3",
            Rules(
                relu=ReLU(temperature=0.3, gate="sigmoid"),
                max_pool=MaxPool(mode="soft", temperature=0.3),
                hardswish=Hardswish(temperature=0.3),
            ),
            Ascent(),
        ),
        Preset(
            "semantic",
            "the paper's current version (v5/v6, 'Pulling Back the Curtain on Deep Networks')",
            Rules(hardswish=Hardswish(temperature=0.6)),
            Ascent(eps=None),
        ),
        Preset("vanilla", "the exact gradient (every rule plain)", _PLAIN, Ascent()),
        Preset(
            "guided", "Guided Backprop's ReLU rule, every other rule plain", _PLAIN.replace(relu="guided"), Ascent()
        ),
    )
}
DEFAULT_RULES = "excitation"
# The exact gradient's rules: a model's forward pass is the same under every rule set.
VANILLA: Rules = PRESETS["vanilla"].rules


ASCENT_SETTINGS: dict[str, Setting] = {f.name: Setting(f.name, "ascent", f.name, f) for f in dataclasses.fields(Ascent)}
# Every flat setting, rules first: the one table the keyword overrides, the command line's flags, the
# app's controls and the sweep's manifest are generated from.
SETTINGS: dict[str, Setting] = {
    **RULE_SETTINGS,
    **ASCENT_SETTINGS,
}


def preset(name: str = DEFAULT_RULES) -> Preset:
    """The preset called ``name``; ValueError listing the choices if there is none."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"unknown rules {name!r}: use one of {', '.join(PRESETS)} (or a jaxpull.Rules)")
    return PRESETS[name]


def _check_known(overrides: Mapping[str, Any], allowed: Mapping[str, Setting]) -> None:
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        hint = ""
        if "pool_weights" in unknown:
            hint = " (pool_weights is now max_pool: soft, detached or plain)"
        raise ValueError(f"unknown setting(s) {', '.join(unknown)}: use {', '.join(allowed)}{hint}")


def resolve(rules: Rules | str = DEFAULT_RULES, **overrides) -> Rules:
    """The rules to use: the preset named ``rules`` (or the composite given), with the flat rule
    settings ``overrides`` (``temperature=0.4``, ``gelu="plain"``, ...) replacing its values, each checked.

    Raises:
      ValueError: an unknown preset or setting, or a value out of its range (one line naming it).
    """
    _check_known(overrides, RULE_SETTINGS)
    if isinstance(rules, Rules):
        base = rules
    elif isinstance(rules, str):
        base = preset(rules).rules
    else:
        raise ValueError(f"rules must be a preset name ({', '.join(PRESETS)}) or a jaxpull.Rules, got {rules!r}")
    return base.replace(**overrides) if overrides else base


def scalars(rules: Rules, ascent: Ascent | None = None) -> None:
    """ValueError if a concrete number of ``rules`` (or ``ascent``) is an array: one call computes one
    rule set. Inside ``jax.vmap`` the numbers are tracers (one slice each) and pass."""
    for owner, table in ((rules, RULE_SETTINGS), (ascent, ASCENT_SETTINGS)):
        if owner is None:
            continue
        for name, s in table.items():
            holder = owner if s.part == "ascent" else getattr(owner, s.part)
            value = getattr(holder, s.attr)
            if s.kind == "number" and np.ndim(value) > 0 and not isinstance(value, jax.core.Tracer):
                raise ValueError(
                    f"{name} has {np.size(value)} values: one call takes one; sweep over them with jax.vmap "
                    f"(in_axes=rules.batch_axes()) or `jaxpull sweep --temperatures`"
                )


def resolve_ascent(rules: Rules | str = DEFAULT_RULES, ascent: Ascent | str | None = None, **overrides) -> Ascent:
    """The ascent to use: ``ascent`` (an :class:`Ascent`, or a preset's name), else the ascent of the
    preset named ``rules`` (the default preset's for a composite), with the flat ascent settings
    ``overrides`` (``steps=10``, ``eps=None``, ...) replacing its values, each checked."""
    _check_known(overrides, ASCENT_SETTINGS)
    if isinstance(ascent, Ascent):
        base = ascent
    elif ascent is not None:
        base = preset(ascent).ascent
    else:
        base = preset(rules if isinstance(rules, str) else DEFAULT_RULES).ascent
    return dataclasses.replace(base, **{k: ASCENT_SETTINGS[k].check(v) for k, v in overrides.items()})


def split(settings: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Flat settings split into (rule settings, ascent settings); ValueError for unknown names."""
    _check_known(settings, SETTINGS)
    rule = {k: v for k, v in settings.items() if k in RULE_SETTINGS}
    return rule, {k: v for k, v in settings.items() if k in ASCENT_SETTINGS}


def resolve_both(
    rules: Rules | str = DEFAULT_RULES, ascent: Ascent | str | None = None, **settings
) -> tuple[Rules, Ascent]:
    """:func:`resolve` and :func:`resolve_ascent` from one set of flat settings (rule and ascent names)."""
    rule, asc = split(settings)
    return resolve(rules, **rule), resolve_ascent(rules, ascent, **asc)


def record(rules: Rules, ascent: Ascent | None = None, name: str | None = None) -> dict[str, Any]:
    """Every setting's value, JSON-able (what a saved result and a sweep's manifest store), with the
    preset's name when the composite was resolved from one."""
    out: dict[str, Any] = {"rules": name} if name is not None else {}
    out.update(rules.settings())
    if ascent is not None:
        out.update({n: s.get(ascent) for n, s in ASCENT_SETTINGS.items()})
    return out


# The paper's comparison (its figure's rows): method name -> the rules of each.
COMPARISON: dict[str, dict[str, Any]] = {
    "excitation": dict(rules="excitation"),
    "semantic": dict(rules="semantic"),
    "vanilla gradient": dict(rules="vanilla"),
}


def resolve_methods(methods: Mapping[str, Any]) -> dict[str, Rules]:
    """Rules per method: ``methods`` maps a name to a :class:`Rules`, a preset's name, or a dict of
    ``rules`` and flat rule settings. Checks that there is at least one method."""
    if not isinstance(methods, Mapping) or not methods:
        raise ValueError(f"methods must be a non-empty dict of name -> rules, got {methods!r}")
    out = {}
    for name, given in methods.items():
        try:
            if isinstance(given, (Rules, str)):
                out[name] = resolve(given)
            elif isinstance(given, Mapping):
                out[name] = resolve(**given)
            else:
                raise ValueError(f"give a jaxpull.Rules, a preset name or a dict of rules and settings, got {given!r}")
        except ValueError as e:
            raise ValueError(f"method {name!r}: {e}") from None
        except TypeError as e:
            raise ValueError(f"method {name!r}: {e}") from None
    return out


def settings_markdown() -> str:
    """The table of every setting and its value in each preset, as ``docs/method.md`` shows it
    (generated here, and checked against the document by tests/test_rules.py)."""
    names = list(PRESETS)
    lines = [
        "| setting | what it sets | " + " | ".join(f"`{n}`" for n in names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for name, s in SETTINGS.items():
        values = []
        for p in PRESETS.values():
            v = s.get(p.ascent if s.part == "ascent" else getattr(p.rules, s.part))
            values.append("none" if v is None else f"{v:g}" if isinstance(v, float) else str(v))
        doc = s.summary.replace("|", "\\|")
        if s.kind == "choice":
            doc += ": " + ", ".join(f"`{c}`" for c in s.choices)
        lines.append(f"| `{name}` | {doc} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"
