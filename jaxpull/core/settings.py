"""The settings of an explanation, each with one owner, validated in one place.

* the gates: :class:`~jaxpull.core.gates.Gating`, built by :func:`make_gating`;
* the projected gradient ascent: :class:`Ascent`, built by :func:`make_ascent`;
* the two named rule sets of METHOD.md, :data:`PRESETS` (``rules="excitation"``, the default,
  and ``rules="semantic"``): each gives every gate and ascent setting a value, and any keyword
  given explicitly beats the preset.

Every entry point (``jaxpull.pullback`` / ``jaxpull.ascent``, the sweep, the explainers, the CLI
and the app) builds its settings with these two functions; their defaults are the presets'.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional

import jax

from jaxpull.core import checks
from jaxpull.core.gates import ATTENTION_RULES, GATES, LAYER_NORM_RULES, POOL_WEIGHTS, Gating

LOSSES = ("logit", "cross_entropy", "self_explain")


class _FromRules:
    """The default of every setting keyword: "take the value of the chosen rules preset"."""

    def __repr__(self) -> str:
        return "<from rules>"


FROM_RULES: Any = _FromRules()


def _static(default):
    return dataclasses.field(default=default, metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Ascent:
    """The projected gradient ascent of METHOD.md ("Explanations"); defaults are METHOD.md's.

    Each step: g = gated gradient of the loss; x <- x + alpha * g / ||g||_2 (times ||x||_2 with
    ``relative_alpha``); if ``project``, project x - x0 onto the L2 ball of radius ``eps``; if
    ``clip``, clamp x to [-1 - margin, 1 + margin]. Build it with :func:`make_ascent` (which
    validates); ``print`` shows every setting.

    Attributes:
      steps: number of steps (traced: a new count does not recompile).
      alpha: step size (traced).
      eps: L2 ball radius around x0 (traced); ``None`` exactly when ``project`` is False.
      margin: slack of the clamp box (traced).
      loss: ``"logit"`` (target logit), ``"cross_entropy"`` (negative cross-entropy) or
        ``"self_explain"`` (0.5 * ||logits||^2, targets ignored). Static.
      relative_alpha: step ``alpha * ||x||_2`` instead of ``alpha``. Static.
      project: project onto the L2 ball of radius ``eps``. Static.
      clip: clamp after every step. Static.
    """

    steps: Any = 5
    alpha: Any = 20.0
    eps: Any = 100.0
    margin: Any = 0.0
    loss: str = _static("logit")
    relative_alpha: bool = _static(False)
    project: bool = _static(True)
    clip: bool = _static(True)


@dataclasses.dataclass(frozen=True)
class Rules:
    """A named rule set: every gate and ascent setting of one version of the method.

    ``pool_temperature=None`` means "the same as ``temperature``" (also when that is overridden).
    The rules for GELU, SiLU, LayerNorm and attention are the current version's in both presets:
    the first version defines none (it covers ReLU networks only).
    """

    name: str
    description: str
    temperature: float
    pool_temperature: Optional[float]
    gate: str
    pool_weights: str
    ascent: Ascent
    gelu_temperature: Optional[float] = 1.0
    silu_temperature: Optional[float] = 1.6
    layer_norm: str = "detached"
    attention: str = "tempered"
    attention_temperature: Optional[float] = 1.0


PRESETS: Dict[str, Rules] = {
    "excitation": Rules(
        "excitation",
        "the paper's first version (arXiv 2507.22832 v1)",
        temperature=0.3,
        pool_temperature=None,
        gate="sigmoid",
        pool_weights="soft",
        ascent=Ascent(),
    ),
    "semantic": Rules(
        "semantic",
        "the paper's current version (v5/v6, 'Pulling Back the Curtain on Deep Networks')",
        temperature=0.6,
        pool_temperature=0.3,
        gate="normal_cdf",
        pool_weights="detached",
        ascent=Ascent(eps=None, project=False),
    ),
}
DEFAULT_RULES = "excitation"


def preset(rules: str = DEFAULT_RULES) -> Rules:
    """The preset called ``rules``; ValueError listing the choices if there is none."""
    if not isinstance(rules, str) or rules not in PRESETS:
        raise ValueError(f"unknown rules {rules!r}: use one of {', '.join(PRESETS)}")
    return PRESETS[rules]


def make_gating(
    temperature: Optional[float] = FROM_RULES,
    pool_temperature: Optional[float] = FROM_RULES,
    gate: str = FROM_RULES,
    pool_weights: str = FROM_RULES,
    *,
    rules: str = DEFAULT_RULES,
    gelu_temperature: Optional[float] = FROM_RULES,
    silu_temperature: Optional[float] = FROM_RULES,
    layer_norm: str = FROM_RULES,
    attention: str = FROM_RULES,
    attention_temperature: Optional[float] = FROM_RULES,
) -> Gating:
    """Validate the gate settings and build a :class:`~jaxpull.core.gates.Gating`.

    Every setting not given comes from the preset ``rules``. ``temperature=None`` gives the
    exact vanilla gradient of every layer (the preset's other rules are then dropped, and giving
    one is an error); temperatures may be arrays (vmapped sweeps); ``pool_temperature=None``
    means "same as temperature". ``gelu_temperature`` / ``silu_temperature`` None: that
    activation keeps its plain derivative; ``layer_norm``: ``"detached"`` or ``"plain"``;
    ``attention``: ``"tempered"`` (with ``attention_temperature``), ``"value_only"`` or ``"plain"``.
    """
    p = preset(rules)
    given = lambda v, default: default if v is FROM_RULES else v
    gate = checks.choice(given(gate, p.gate), GATES, "gate")
    pool_weights = checks.choice(given(pool_weights, p.pool_weights), POOL_WEIGHTS, "pool_weights")
    t = checks.temperature(given(temperature, p.temperature))
    others = dict(
        pool_temperature=pool_temperature,
        gelu_temperature=gelu_temperature,
        silu_temperature=silu_temperature,
        layer_norm=layer_norm,
        attention=attention,
        attention_temperature=attention_temperature,
    )
    if t is None:
        named = [k for k, v in others.items() if v is not FROM_RULES and v is not None and v != "plain"]
        if named:
            raise ValueError(
                f"{', '.join(named)} needs a temperature: set temperature too, or none of them for vanilla"
            )
        return Gating(gate=gate, pool_weights=pool_weights)
    tp = checks.temperature(given(pool_temperature, p.pool_temperature), "pool_temperature")
    attention = checks.choice(given(attention, p.attention), ATTENTION_RULES, "attention")
    ta = given(attention_temperature, p.attention_temperature) if attention == "tempered" else None
    if attention != "tempered" and attention_temperature not in (FROM_RULES, None):
        raise ValueError(f'attention_temperature applies to attention="tempered", not {attention!r}: drop one')
    if attention == "tempered" and ta is None:
        raise ValueError('attention="tempered" needs attention_temperature: give a positive number')
    return Gating(
        t,
        t if tp is None else tp,
        gate,
        pool_weights,
        gelu_temperature=checks.temperature(given(gelu_temperature, p.gelu_temperature), "gelu_temperature"),
        silu_temperature=checks.temperature(given(silu_temperature, p.silu_temperature), "silu_temperature"),
        layer_norm=checks.choice(given(layer_norm, p.layer_norm), LAYER_NORM_RULES, "layer_norm"),
        attention=attention,
        attention_temperature=checks.temperature(ta, "attention_temperature"),
    )


# the gate settings make_gating takes, by keyword (the first four also by position)
GATE_SETTINGS = (
    "temperature",
    "pool_temperature",
    "gate",
    "pool_weights",
    "gelu_temperature",
    "silu_temperature",
    "layer_norm",
    "attention",
    "attention_temperature",
)


# The paper's comparison (its figure's rows): method name -> the rules and gate settings of each.
COMPARISON: Dict[str, Dict[str, Any]] = {
    "excitation": dict(rules="excitation"),
    "semantic": dict(rules="semantic"),
    "vanilla gradient": dict(rules="excitation", temperature=None),
}


def make_gatings(methods: Mapping[str, Mapping[str, Any]]) -> Dict[str, Gating]:
    """One :func:`make_gating` per method: ``methods`` maps a name to ``rules`` and gate settings
    (``GATE_SETTINGS``). Checks that there is at least one method and no other keyword."""
    if not isinstance(methods, Mapping) or not methods:
        raise ValueError(f"methods must be a non-empty dict of name -> rules and gate settings, got {methods!r}")
    gatings = {}
    for name, given in methods.items():
        if not isinstance(given, Mapping):
            raise ValueError(f"method {name!r}: give a dict of rules and gate settings, got {given!r}")
        unknown = sorted(set(given) - {"rules", *GATE_SETTINGS})
        if unknown:
            raise ValueError(
                f"method {name!r}: unknown setting(s) {', '.join(unknown)}: use rules, {', '.join(GATE_SETTINGS)}"
            )
        try:
            gatings[name] = make_gating(**given)
        except ValueError as e:
            raise ValueError(f"method {name!r}: {e}") from None
    return gatings


# the settings make_ascent takes (``project`` follows from ``eps``)
ASCENT_SETTINGS = tuple(f.name for f in dataclasses.fields(Ascent) if f.name != "project")


def make_ascent(*, rules: str = DEFAULT_RULES, **overrides) -> Ascent:
    """Validate the ascent settings and build an :class:`Ascent`.

    ``overrides``: any of steps, alpha, eps (None: no projection), margin, loss, relative_alpha,
    clip; every setting not given (or given as ``FROM_RULES``) comes from the preset ``rules``.
    Concrete numbers become Python numbers (so every call shares one compiled function); traced
    values pass through.
    """
    unknown = sorted(set(overrides) - set(ASCENT_SETTINGS))
    if unknown:
        raise ValueError(f"unknown ascent option(s) {', '.join(unknown)}: use {', '.join(ASCENT_SETTINGS)}")
    base = preset(rules).ascent
    v = {k: getattr(base, k) if overrides.get(k, FROM_RULES) is FROM_RULES else overrides[k] for k in ASCENT_SETTINGS}
    eps = v["eps"]
    if eps is not None:
        eps = checks.positive_number(eps, "eps", " (or None for no projection)")
    return Ascent(
        steps=checks.whole(v["steps"], "steps", 0),
        alpha=checks.positive_number(v["alpha"], "alpha"),
        eps=eps,
        margin=checks.non_negative(v["margin"], "margin"),
        loss=checks.choice(v["loss"], LOSSES, "loss"),
        relative_alpha=checks.flag(v["relative_alpha"], "relative_alpha"),
        project=eps is not None,
        clip=checks.flag(v["clip"], "clip"),
    )


def resolved(rules: str = DEFAULT_RULES, **given) -> Dict[str, Any]:
    """Every gate and ascent setting once ``given`` (any of ``GATE_SETTINGS`` and ``ASCENT_SETTINGS``)
    overrides the preset ``rules``, checked as ``make_gating`` and ``make_ascent`` check them:
    ``{"rules": ..., "temperature": ..., ..., "steps": ..., "alpha": ..., "eps": ..., "margin": ...}``,
    what a saved result records."""
    gating = make_gating(**{k: v for k, v in given.items() if k in GATE_SETTINGS}, rules=rules)
    ascent = make_ascent(**{k: v for k, v in given.items() if k not in GATE_SETTINGS}, rules=rules)
    return dict(
        rules=rules,
        **{n: getattr(gating, n) for n in GATE_SETTINGS},
        **{n: getattr(ascent, n) for n in ("steps", "alpha", "eps", "margin")},
    )
