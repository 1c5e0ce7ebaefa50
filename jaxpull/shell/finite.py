"""Refusing results built from non-finite values: no ranking, figure or list of labels from NaN or inf.

Every setting is validated when its rule is built, but some combinations a float64 check passes
still overflow in float32 (an attention temperature of 1e-30 makes every score infinite). The
commands check what they computed before they report it, and name the settings to change: those
that differ from the preset's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxpull.core import settings
from jaxpull.core.rules import Rules
from jaxpull.core.settings import Ascent


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(np.all(np.asarray(a) == np.asarray(b)))
    except (TypeError, ValueError):
        return a == b


def changed_settings(
    rules: Rules, ascent: Ascent | None, preset: str | None, extra: Mapping[str, Any] = ()
) -> list[str]:
    """``["attention_temperature=1e-30", ...]``: the settings of ``rules`` and ``ascent`` that differ
    from the preset named ``preset`` (every number setting for a composite of one's own), and ``extra``."""
    mine = settings.record(rules, ascent)
    if isinstance(preset, str) and preset in settings.PRESETS:
        p = settings.PRESETS[preset]
        base = settings.record(p.rules, p.ascent)
        names = [n for n, v in mine.items() if not _same(v, base.get(n))]
    else:
        names = [n for n, s in settings.SETTINGS.items() if s.kind == "number" and n in mine]
    out = [f"{n}={_show(mine[n])}" for n in names]
    out += [f"{n}={_show(v)}" for n, v in dict(extra).items()]
    return out


def _show(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return ",".join(_show(x) for x in v)
    return str(v)


def require_finite(values, what: str, suspects: list[str]) -> None:
    """ValueError naming ``suspects`` (settings) if ``values`` holds a NaN or an infinity."""
    a = np.asarray(values)
    if np.isfinite(a).all():
        return
    nan, inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
    cause = (
        f"float32 overflowed under {', '.join(suspects)}: choose values nearer the preset's"
        if suspects
        else "float32 overflowed (the model's own numbers?)"
    )
    raise ValueError(f"{what} hold {nan} NaN and {inf} infinite values, so nothing is reported: {cause}")
