"""What every backward rule is made of: a frozen dataclass whose numbers are pytree leaves and whose
choices are static, validated when it is built.

A rule class declares its fields with :func:`number` (a traced leaf: a temperature), :func:`choice`
(a static string: a mode, a gate shape) and the :func:`rule` decorator makes it a frozen dataclass,
a JAX pytree and a validated constructor:

* a bad value is a one-line ``ValueError`` naming the field and what it accepts, raised when the object
  is built (``ReLU(temperature=-1)``), never later inside a trace;
* numbers may be arrays (one rule per entry, for ``jax.vmap``) and tracers (inside ``jit`` / ``vmap``,
  where they pass unchecked);
* pytree unflattening (``jax.jit``, ``jax.vmap``'s ``in_axes``, ``jax.tree.map``) rebuilds the object
  without checking: there the leaves may be tracers, axis numbers or ``None``.

Each field carries its documentation in its metadata (``doc``, and for a choice the meaning of each
value): the command line's flags, the app's controls and ``docs/method.md``'s tables are generated from it.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Collection, Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, TypeVar

import jax
import numpy as np

if sys.version_info >= (3, 11):
    from typing import dataclass_transform
else:  # Python 3.10: the backport (a dependency of flax)
    from typing_extensions import dataclass_transform

# The largest float32 (numbers above it become inf in the float32 computation).
FLOAT32_MAX = float(np.finfo(np.float32).max)
# The smallest positive float32 (a subnormal): smaller positive numbers become 0 in float32.
FLOAT32_TINY = float(np.nextafter(np.float32(0), np.float32(1)))


def number(
    default,
    doc: str,
    *,
    low: float = FLOAT32_TINY,
    high: float = FLOAT32_MAX,
    hint: str = "",
    plain_hint: bool = False,
    integer: bool = False,
    optional: bool = False,
):
    """A traced number field (a pytree leaf) in ``[low, high]``; ``integer``: a whole number;
    ``optional``: None allowed (an empty subtree: a different compiled function).

    ``hint`` is appended to the error message; ``plain_hint``: the message says how to get the exact
    derivative instead (the rule's mode ``plain``), spelled as the API or the command line takes it.
    """
    meta = dict(
        kind="number", doc=doc, low=low, high=high, hint=hint, plain_hint=plain_hint, integer=integer, optional=optional
    )
    return dataclasses.field(default=default, metadata=meta)


def flag(default: bool, doc: str):
    """A static True/False field."""
    return dataclasses.field(default=default, metadata=dict(kind="flag", doc=doc))


def choice(default: str, choices: Mapping[str, str], doc: str):
    """A static string field: one of ``choices`` (value -> what it means)."""
    if default not in choices:
        raise AssertionError(f"default {default!r} is not one of {list(choices)}")
    return dataclasses.field(default=default, metadata=dict(kind="choice", doc=doc, choices=dict(choices)))


def kind(field: dataclasses.Field) -> str:
    """``"number"``, ``"choice"``, ``"flag"`` or ``"rule"`` (a nested rule object: a composite's field)."""
    return field.metadata.get("kind", "rule")


class SettingError(ValueError):
    """A setting's value out of its range: one line naming the setting, what it takes and what it got,
    spelled as the API takes it (``str``) or as the command line does (:meth:`as_flag`)."""

    def __init__(self, name: str, body: str, note: str = "", plain_mode: str | None = None):
        self.name, self.body, self.note, self.plain_mode = name, body, note, plain_mode
        super().__init__(self.render())

    def render(self, flags: bool = False) -> str:
        """The message; ``flags``: settings spelled as command-line flags (``--pool-temperature``)."""
        spell = (lambda n: "--" + n.replace("_", "-")) if flags else (lambda n: n)
        text = f"{spell(self.name)} {self.body}{self.note}"
        if self.plain_mode is not None:
            use = f"{spell(self.plain_mode)} plain" if flags else f"{self.plain_mode}='plain'"
            text += f" (for the exact derivative use {use})"
        return text

    def as_flag(self) -> str:
        return self.render(flags=True)


def _concrete(value) -> bool:
    return not isinstance(value, jax.core.Tracer)


def check_number(
    value,
    name: str,
    low: float,
    high: float,
    hint: str = "",
    integer: bool = False,
    optional: bool = False,
    plain_mode: str | None = None,
):
    """``value`` if it is a number (or array of numbers) in ``[low, high]`` as float32 computes it,
    else a one-line :class:`SettingError` naming ``name`` and the range (and, with ``plain_mode``, the
    mode setting that gives the exact derivative). Tracers pass through; a concrete scalar comes back
    as a Python float (an int if ``integer``; arrays as float32 NumPy arrays); None passes if ``optional``."""
    if not _concrete(value) or (value is None and optional):
        return value
    what = "a whole number" if integer else "a number"
    if low == FLOAT32_TINY:
        allowed = f"a positive number up to {high:.3g}"
    else:
        allowed = f"{what} in [{low:.3g}, {high:.3g}]"
    allowed += " or None" if optional else ""
    fail = lambda got: SettingError(name, f"must be {allowed}, got {got}", hint, plain_mode)
    if isinstance(value, (bool, np.bool_, str, bytes)) or value is None or getattr(value, "dtype", None) == np.bool_:
        raise fail(repr(value))
    try:
        a = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise fail(repr(value)) from None
    if a.size == 0:
        raise fail("an empty array")
    with np.errstate(over="ignore"):
        as32 = a.astype(np.float32)
    # the bounds as float32 computes them: 1e-45 is float32's smallest positive number, 1e-50 is 0 there
    bad = ~np.isfinite(a) | (as32 < np.float32(low)) | (a > high) | ~np.isfinite(as32) | ((a > 0) & (as32 == 0))
    if integer:
        bad |= np.isfinite(a) & (a != np.round(a))
    if np.any(bad):
        shown = repr(value) if a.ndim == 0 else f"{a[bad].ravel()[0]:g} (in an array of {a.size})"
        raise fail(shown)
    if integer:
        return int(a) if a.ndim == 0 else np.asarray(value, np.int32)
    return float(a) if a.ndim == 0 else np.asarray(value, np.float32)


def check_flag(value, name: str) -> bool:
    """``value`` if it is True or False, else a one-line ValueError."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_field(field: dataclasses.Field, value, name: str, mode_name: str = "mode"):
    """``value`` checked as the number, choice or flag ``field`` declares (the error names ``name``,
    and where the field says so, the mode setting ``mode_name`` that gives the exact derivative)."""
    m = field.metadata
    k = kind(field)
    if k == "number":
        plain = mode_name if m["plain_hint"] else None
        return check_number(value, name, m["low"], m["high"], m["hint"], m["integer"], m["optional"], plain)
    if k == "choice":
        return check_choice(value, name, m["choices"])
    if k == "flag":
        return check_flag(value, name)
    raise AssertionError(k)


def check_choice(value, name: str, choices: Collection[str]) -> str:
    """``value`` if it is one of ``choices`` (names, or a mapping name -> meaning), else a one-line
    ValueError listing them."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {name} {value!r}: use one of {', '.join(choices)}")
    return value


class Validated:
    """Base of the classes the :func:`validated` decorator makes (the rules, their composite, the ascent)."""

    if TYPE_CHECKING:  # for the type checker: every subclass is made a dataclass by the decorator
        __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    def _validate(self) -> None:
        """Checks across fields (after each field is checked); subclasses override."""

    def replace(self, **changes):
        """A copy with ``changes`` (``dataclasses.replace`` semantics), validated."""
        return dataclasses.replace(self, **changes)

    def __repr__(self) -> str:
        parts = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            parts.append(f"{f.name}={v!r}" if not isinstance(v, np.ndarray) else f"{f.name}=array{v.shape}")
        return f"{type(self).__name__}({', '.join(parts)})"


class Rule(Validated):
    """Base of the rule classes and of the :class:`~jaxpull.core.rules.Rules` composite."""


V = TypeVar("V", bound=Validated)


@dataclass_transform(frozen_default=True)  # the type checker's view of what the decorator makes: a frozen dataclass
def validated(cls: type[V]) -> type[V]:
    """Make ``cls`` (a subclass of :class:`Validated` with annotated fields) a frozen, validated dataclass
    registered as a JAX pytree: :func:`number` fields and nested objects are children, :func:`choice`
    and :func:`flag` fields are static."""
    return _validated(cls)


def _validated(cls):
    # Untyped on purpose: it sets the class's __post_init__, __eq__ and __hash__, which a type checker does not model.
    label = cls.__name__

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            name = f"{label}.{f.name}"
            if kind(f) != "rule":
                value = check_field(f, value, name)
            elif not isinstance(value, rule_class(f)):
                raise ValueError(f"{name} must be a {f.type} rule object, got {value!r}")
            object.__setattr__(self, f.name, value)
        self._validate()

    cls.__post_init__ = __post_init__  # before the dataclass is made: its __init__ calls it only then
    cls = dataclasses.dataclass(frozen=True, repr=False, eq=True)(cls)
    fields = dataclasses.fields(cls)
    children = tuple(f.name for f in fields if kind(f) in ("number", "rule"))
    static = tuple(f.name for f in fields if kind(f) in ("choice", "flag"))

    def flatten_with_keys(obj):
        keyed = tuple((jax.tree_util.GetAttrKey(n), _leaf(getattr(obj, n))) for n in children)
        return keyed, tuple(getattr(obj, n) for n in static)

    def unflatten(aux, leaves):
        obj = object.__new__(cls)  # no checks: leaves may be tracers, axis numbers or None here
        for n, v in zip(children, leaves, strict=True):
            object.__setattr__(obj, n, v)
        for n, v in zip(static, aux, strict=True):
            object.__setattr__(obj, n, v)
        return obj

    def flatten(obj):
        return tuple(_leaf(getattr(obj, n)) for n in children), tuple(getattr(obj, n) for n in static)

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return all(_same(getattr(self, f.name), getattr(other, f.name)) for f in fields)

    cls.__eq__ = __eq__
    cls.__hash__ = None  # numbers may be arrays: a rule is not a dictionary key (jit takes it as a pytree)
    return cls


def rule_class(field: dataclasses.Field) -> type:
    """The rule class of a composite's rule field: its default factory, or the class that factory's
    ``functools.partial`` builds."""
    factory: Any = field.default_factory
    return getattr(factory, "func", factory)


def _leaf(value):
    """A checked Python float as the float32 scalar the computation takes (a strongly typed leaf, so
    every value shares one compiled function with float32 arrays); anything else unchanged."""
    return np.float32(value) if type(value) is float else value


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.shape(a) == np.shape(b) and bool(np.all(np.asarray(a) == np.asarray(b)))
    return a == b


def field_docs(cls) -> Iterator[tuple[str, dataclasses.Field]]:
    """``(name, field)`` of each field of a rule class, in declaration order."""
    for f in dataclasses.fields(cls):
        yield f.name, f


def as_float(value) -> Any | None:
    """A number field's value for a record (JSON): a float, or a list for an array; None stays None."""
    if value is None:
        return None
    a = np.asarray(value, np.float64)
    return float(a) if a.ndim == 0 else a.tolist()


def defaults(cls) -> dict[str, Any]:
    """Every field's default of a rule class."""
    return {f.name: f.default for f in dataclasses.fields(cls)}


class Setting(NamedTuple):
    """One flat setting: the field ``attr`` of the object in the composite's field ``part`` (``"ascent"``:
    the ascent's own fields). :data:`jaxpull.core.settings.SETTINGS` lists them all."""

    name: str
    part: str
    attr: str
    field: dataclasses.Field
    label: str = ""  # what the part is for, where its class serves several parts (attention kinds)

    @property
    def kind(self) -> str:
        """``"number"`` (a traced leaf), ``"choice"`` or ``"flag"`` (static)."""
        return kind(self.field)

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(self.field.metadata.get("choices", ()))

    @property
    def summary(self) -> str:
        """What it sets, in a few words."""
        return self.field.metadata["doc"] + (f" of {self.label}" if self.label else "")

    @property
    def doc(self) -> str:
        """What it sets and what each choice means, for help texts."""
        m = self.field.metadata
        if self.kind == "choice":
            return f"{self.summary} (" + "; ".join(f"{k}: {v}" for k, v in m["choices"].items()) + ")"
        return self.summary

    def check(self, value):
        """``value`` checked as this setting (the error names it)."""
        return check_field(self.field, value, self.name, self.part)

    def get(self, owner) -> Any:
        """This setting's value in ``owner`` (the rule object or ascent it belongs to), JSON-able."""
        v = getattr(owner, self.attr)
        return as_float(v) if self.kind == "number" else v
