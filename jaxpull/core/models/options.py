"""Builder options of a family (``ModelSpec.config``): their declared types, and the check of a config.

A family file declares the options its builder takes beyond the number of classes, as
``CONFIG_OPTIONS = {name: type}`` with the types written as ``typing`` annotations:

- ``int`` / ``float``: a whole number in [1, ``WIDTH``] / a finite number in (0, ``WIDTH``];
  ``Annotated[int, Range(lo, hi)]`` (or ``float``) for other bounds (``COUNT``: layers and heads);
- ``str``, ``bool``, ``Literal[...]`` (one of the listed values), ``X | None`` (or ``Optional[X]``);
- ``tuple[X, ...]`` (any length >= 1) and ``tuple[X, Y, Z]`` (exactly those), lists accepted.

A model file records its config as JSON; ``check`` refuses any option the family does not
declare and any value of the wrong type or out of its range, with one line naming the option,
before a module is built from it (a ViT of 10**9 layers, a string where a width belongs).
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any, NamedTuple


class Range(NamedTuple):
    """Bounds of a number option: ``lo <= value <= hi`` for ints, ``lo < value <= hi`` for floats."""

    lo: float
    hi: float


WIDTH = 1 << 16  # channels, features, pixels: far above any torchvision model's
COUNT = Annotated[int, Range(1, 256)]  # layers per stage, heads, stages
NO_OPTIONS: Mapping[str, Any] = {}


def _check(value: Any, kind: Any, where: str) -> Any:
    """``value`` as ``kind`` (lists as tuples); ValueError naming ``where`` otherwise."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    bounds = None
    if origin is Annotated:
        kind, bounds = args[0], args[1]
        origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Union or origin is types.UnionType:  # Optional[X], and X | None (its py310 spelling)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check(value, inner[0] if len(inner) == 1 else typing.Union[tuple(inner)], where)  # noqa: UP007 (a Union of types only known at run time)
    if origin is typing.Literal:
        if not any(value == a and type(value) is type(a) for a in args):  # 1.0 or True is not 1
            raise ValueError(f"{where} is {value!r}, not one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or not value:
            raise ValueError(f"{where} is {value!r}, not a non-empty list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ValueError(f"{where} has {len(value)} entries, not {len(args)}")
        return tuple(_check(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if kind is int:
        lo, hi = bounds or (1, WIDTH)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ValueError(f"{where} is {value!r}, not a whole number in [{lo:g}, {hi:g}]")
        return value
    if kind is float:
        lo, hi = bounds or (0, WIDTH)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{where} is {value!r}, not a finite number")
        if not lo < value <= hi:
            raise ValueError(f"{where} is {value!r}, not in ({lo:g}, {hi:g}]")
        return float(value)
    if kind in (str, bool):
        if not isinstance(value, kind):
            raise ValueError(f"{where} is {value!r}, not a {kind.__name__}")
        return value
    raise TypeError(f"{where}: unsupported option type {kind!r} in a family's CONFIG_OPTIONS")


def check(arch: str, config: Mapping[str, Any], declared: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """``config`` checked against ``declared`` (a family's ``CONFIG_OPTIONS``), as sorted
    ``(name, value)`` pairs with lists made tuples; ValueError naming the first bad option."""
    unknown = sorted(set(config) - set(declared))
    if unknown:
        known = ", ".join(declared) if declared else "none"
        raise ValueError(f"config option {unknown[0]!r} is not one of {arch}'s builder options ({known})")
    return tuple(
        sorted((name, _check(value, declared[name], f"config option {name}")) for name, value in config.items())
    )
