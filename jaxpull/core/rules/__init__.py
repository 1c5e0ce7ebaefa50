"""Backward rules as data: one rule object per layer kind, composed into :class:`Rules`.

The method keeps every forward pass exact and changes one derivative per layer kind
(``docs/method.md``). Each kind has a small rule class, validated when it is built, holding its
numbers as JAX pytree leaves (traced: a new temperature never recompiles, and ``jax.vmap`` over an
array of them works) and its choices as static data:

================  ==================  =========================================================
field             class               applies to
================  ==================  =========================================================
``relu``          :class:`ReLU`        every ReLU and ReLU6 (``rules.relu(z)``, ``max_value=6``)
``max_pool``      :class:`MaxPool`     every max-pool (``rules.max_pool(x, window, stride, pad)``)
``hardswish``     :class:`Hardswish`   every Hardswish (MobileNetV3)
``gelu``          :class:`GELU`        every GELU (erf and tanh forms)
``silu``          :class:`SiLU`        every SiLU / Swish
``layer_norm``    :class:`LayerNorm`   every LayerNorm (and ConvNeXt's LayerNorm2d)
``attention``     :class:`Attention`   multi-head self-attention (ViT, Swin, MaxViT)
``sr_attention``  :class:`Attention`   PVT-v2's spatial-reduction attention
================  ==================  =========================================================

A model's layers call their kind's rule (``y = rules.relu(conv(x))``); a composite is passed whole
through the model. Named composites (presets, with their ascent settings) are in
:data:`jaxpull.core.settings.PRESETS`.

Every setting also has one flat name (:data:`SETTINGS`): ``temperature``, ``gate``, ``relu``,
``pool_temperature``, ``max_pool``, ... . ``rules.replace(temperature=0.4, gelu="plain")`` changes
them with ``dataclasses.replace`` semantics; the API's keyword overrides, the command line's flags,
the sweep's manifest and the app's controls are all generated from this table.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jaxpull.core.rules.activations import GELU, Hardswish, SiLU
from jaxpull.core.rules.attention import Attention
from jaxpull.core.rules.base import Rule, Setting, rule_class, validated
from jaxpull.core.rules.layer_norm import LayerNorm
from jaxpull.core.rules.max_pool import MaxPool
from jaxpull.core.rules.relu import ReLU


def _part(cls, doc: str, names: Mapping[str, str] | None = None, **defaults):
    """A field of :class:`Rules`: a rule object of ``cls`` (default: ``cls(**defaults)``).

    ``names``: the flat setting names of the rule's fields where they are not the automatic ones
    (the mode is called as the field, another field ``{field}_{name}``)."""
    return dataclasses.field(
        default_factory=functools.partial(cls, **defaults), metadata=dict(doc=doc, names=dict(names or {}))
    )


@validated
class Rules(Rule):
    """The backward rule of every layer kind (see the module's table). ``Rules()`` is the paper's
    current version ("semantic"); build others with :func:`jaxpull.core.settings.resolve`
    (a preset name and overrides) or ``Rules(relu=ReLU(temperature=0.3), ...)``.

    Attributes:
      relu: every ReLU and ReLU6.
      max_pool: every max-pool.
      hardswish: every Hardswish.
      gelu: every GELU.
      silu: every SiLU.
      layer_norm: every LayerNorm.
      attention: multi-head self-attention (torchvision's ViT, Swin, MaxViT).
      sr_attention: spatial-reduction attention (PVT-v2).
    """

    relu: ReLU = _part(ReLU, "ReLU and ReLU6", names=dict(temperature="temperature", gate="gate"))
    max_pool: MaxPool = _part(MaxPool, "max-pool", names=dict(temperature="pool_temperature"))
    hardswish: Hardswish = _part(Hardswish, "Hardswish")
    gelu: GELU = _part(GELU, "GELU")
    silu: SiLU = _part(SiLU, "SiLU")
    layer_norm: LayerNorm = _part(LayerNorm, "LayerNorm")
    attention: Attention = _part(Attention, "multi-head self-attention (ViT, Swin, MaxViT)")
    sr_attention: Attention = _part(Attention, "spatial-reduction attention (PVT-v2)", mode="value_only")

    def replace(self, **settings) -> Rules:
        """A copy with flat settings changed (``temperature=0.4``, ``gelu="plain"``; see
        :data:`SETTINGS`), each checked with its name in the error; or whole rule objects by field
        (``relu=ReLU(...)``)."""
        parts: dict[str, Any] = {}
        changes: dict[str, dict[str, Any]] = {}
        for name, value in settings.items():
            if name in RULE_FIELDS and isinstance(value, Rule):
                parts[name] = value
                continue
            if name not in SETTINGS:
                raise ValueError(f"unknown rule setting {name!r}: use one of {', '.join(SETTINGS)}")
            s = SETTINGS[name]
            changes.setdefault(s.part, {})[s.attr] = s.check(value)
        for part, attrs in changes.items():
            parts[part] = dataclasses.replace(parts.get(part, getattr(self, part)), **attrs)
        return dataclasses.replace(self, **parts)

    def settings(self) -> dict[str, Any]:
        """Every flat setting's value, JSON-able (numbers as floats or lists): what a record stores."""
        return {name: s.get(getattr(self, s.part)) for name, s in SETTINGS.items()}

    def batch_axes(self) -> Rules:
        """``jax.vmap``'s ``in_axes`` for this composite: 0 for the numbers given as 1-D arrays, None
        for the scalars. ``jax.vmap(f, in_axes=(rules.batch_axes(),))(rules)`` maps ``f`` over them."""
        return jax.tree.map(lambda v: 0 if np.ndim(v) == 1 else None, self)


RULE_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Rules))


def settings_table(composite=None) -> dict[str, Setting]:
    """Flat setting name -> :class:`Setting` of every field of every rule in ``composite`` (a class
    like :class:`Rules`; default :class:`Rules`). Names: a rule's mode is called as its field in the
    composite, another of its fields ``{field}_{name}``, unless the composite's field renames it."""
    table: dict[str, Setting] = {}
    parts = dataclasses.fields(composite or Rules)
    classes = [rule_class(part) for part in parts]
    for part, cls in zip(parts, classes, strict=True):
        names = part.metadata["names"]
        label = part.metadata["doc"] if classes.count(cls) > 1 else ""
        for f in dataclasses.fields(cls):
            name = names.get(f.name, part.name if f.name == "mode" else f"{part.name}_{f.name}")
            assert name not in table, f"two rule settings are called {name!r}"
            table[name] = Setting(name, part.name, f.name, f, label)
    return table


# Flat setting name -> Setting, in the composite's order: the one table every surface is generated from.
SETTINGS: dict[str, Setting] = settings_table()

__all__ = [
    "Rules",
    "Rule",
    "ReLU",
    "MaxPool",
    "Hardswish",
    "GELU",
    "SiLU",
    "LayerNorm",
    "Attention",
    "SETTINGS",
    "Setting",
    "RULE_FIELDS",
    "settings_table",
]
