"""Input checks of the public functions: one clear error naming the problem and its fix.

Checks run on concrete values only; inside ``jax.jit`` / ``jax.vmap`` tracers pass through.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Images are in [-1, 1]; ascent may push them slightly outside. Beyond this they are not.
_RANGE_LIMIT = 3.0


def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def images(x) -> jax.Array:
    """Validate a batch of images: float ``(N, H, W, 3)`` in [-1, 1]; return it as a float32 array."""
    if not hasattr(x, "shape"):
        x = np.asarray(x)
    if x.ndim != 4:
        hint = " (add a batch axis: x[None])" if x.ndim == 3 else ""
        raise ValueError(f"images must have shape (N, H, W, 3), got shape {tuple(x.shape)}{hint}")
    if x.shape[-1] != 3:
        hint = " (channels-first? use x.transpose(0, 2, 3, 1))" if x.shape[1] == 3 else ""
        raise ValueError(f"images must have 3 channels last, got shape {tuple(x.shape)}{hint}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"images must be floating point in [-1, 1], got dtype {x.dtype} "
            "(for 0-255 pixels use jaxpull.files.images.from_pixels)"
        )
    if 0 in x.shape:
        raise ValueError(f"images is empty (shape {tuple(x.shape)}): give at least one image of at least 1x1 pixels")
    if _concrete(x):
        finite(x, "images")  # explicitly: a max over |x| skips NaN on XLA:CPU
        peak = float(np.max(np.abs(x))) if isinstance(x, np.ndarray) else float(jnp.max(jnp.abs(x)))
        if peak > _RANGE_LIMIT:
            raise ValueError(
                f"images must be in [-1, 1], got values up to {peak:g} "
                "(0-255 pixels? use x / 127.5 - 1 or jaxpull.files.images.from_pixels)"
            )
    return jnp.asarray(x, jnp.float32) if x.dtype != jnp.float32 else jnp.asarray(x)


def finite(x, name: str) -> None:
    """ValueError if the concrete array ``x`` holds a NaN or an infinity (tracers pass through)."""
    if not _concrete(x):
        return
    ok = np.isfinite(x).all() if isinstance(x, np.ndarray) else bool(jnp.isfinite(x).all())
    if not ok:
        bad = np.asarray(x)
        nan, inf = int(np.isnan(bad).sum()), int(np.isinf(bad).sum())
        raise ValueError(f"{name} contain {nan} NaN and {inf} infinite values: replace them with finite numbers")


def attributions(a, shape, name: str = "attributions") -> jax.Array:
    """Validate attribution maps: floating point, finite, of the images' ``shape`` ``(N, H, W, 3)``."""
    if not hasattr(a, "shape"):
        a = np.asarray(a)
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} must have the images' shape {tuple(shape)}, got {tuple(a.shape)}")
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise ValueError(f"{name} must be floating point, got dtype {a.dtype}")
    finite(a, name)
    return jnp.asarray(a, jnp.float32) if a.dtype != jnp.float32 else jnp.asarray(a)


def per_image_labels(value, n: int, num_classes: int, name: str = "targets") -> jax.Array:
    """One class index per image as int32 ``(N,)``; ValueError naming any out of [0, num_classes).

    JAX clamps out-of-range gather indices instead of failing, so every user-given index is
    checked here before it reaches a ``take``.
    """
    if not _concrete(value):
        return value
    t = np.asarray(value)
    if t.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), one class index per image, got {tuple(t.shape)}")
    _class_indices(t, num_classes, name)
    return jnp.asarray(t, jnp.int32)


def _class_indices(t: np.ndarray, num_classes: int, name: str) -> None:
    """ValueError unless ``t`` holds integers in [0, num_classes) (JAX would clamp the rest)."""
    if not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"{name} must be integer class indices, got dtype {t.dtype}")
    bad = t[(t < 0) | (t >= num_classes)]
    if bad.size:
        raise ValueError(f"{name} label {int(bad[0])} is out of range: labels must be in [0, {num_classes})")


def label(value, num_classes: int, class_names: Sequence[str] = ()) -> int:
    """A class index from an int (or integer string) or a class name; ValueError if neither."""
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"label {value!r} must be an int index or a class name, not a bool")
    if isinstance(value, (int, np.integer)) or (isinstance(value, str) and value.strip().lstrip("-").isdigit()):
        index = int(value)
        if not 0 <= index < num_classes:
            raise ValueError(f"label {index} is out of range: use an index in [0, {num_classes})")
        return index
    if isinstance(value, str):
        wanted = value.strip().lower()
        for i, name in enumerate(class_names):
            if name.lower() == wanted:
                return i
        if not class_names:
            raise ValueError(f"label {value!r} is not an index and this model has no class names")
        close = [n for n in class_names if wanted in n.lower()][:5]
        hint = f" (did you mean: {', '.join(close)}?)" if close else ""
        raise ValueError(f"label {value!r} is neither an index nor a class name of this model{hint}")
    raise ValueError(f"label {value!r} must be an int index or a class name")


def targets(value, n: int, num_classes: int) -> jax.Array:
    """Target labels as an int32 ``(N, K)`` array from ``(K,)`` (shared by all images) or ``(N, K)``."""
    t = value if isinstance(value, jax.Array) and not _concrete(value) else np.asarray(value)
    if t.ndim == 0:
        t = t.reshape(1)
    if t.ndim == 1:
        t = t[None, :].repeat(n, axis=0) if isinstance(t, np.ndarray) else jnp.broadcast_to(t[None], (n, t.shape[0]))
    if t.ndim != 2 or t.shape[0] != n:
        raise ValueError(f"targets must have shape (K,) or (N, K) with N = {n} images, got {tuple(t.shape)}")
    if t.shape[1] == 0:
        raise ValueError("targets is empty: give at least one label")
    if isinstance(t, np.ndarray):
        _class_indices(t, num_classes, "target")
    return jnp.asarray(t, jnp.int32)


def _not_bool(value, name: str, hint: str = "") -> None:
    if isinstance(value, (bool, np.bool_)) or getattr(value, "dtype", None) == np.bool_:
        raise ValueError(f"{name} must be a number, got {value!r}{hint}")


def positive(value, name: str, hint: str = "") -> jax.Array:
    """``value`` (scalar or array) as float32 if every entry is positive and finite, else ValueError."""
    if _concrete(value):
        _not_bool(value, name, hint)
        a = np.asarray(value, dtype=np.float64)
        if a.size == 0 or not np.all(np.isfinite(a)) or np.any(a <= 0):
            raise ValueError(f"{name} must be positive and finite, got {value!r}{hint}")
    return jnp.asarray(value, jnp.float32)


def _real(value, name: str, hint: str = "") -> float:
    _not_bool(value, name, hint)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}{hint}") from None


def positive_number(value, name: str, hint: str = ""):
    """A concrete scalar as a Python float if it is positive and finite, else ValueError; tracers pass."""
    if not _concrete(value):
        return value
    v = _real(value, name, hint)
    if not (np.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be positive and finite, got {value!r}{hint}")
    return v


def non_negative(value, name: str):
    """A concrete scalar as a Python float if it is finite and >= 0, else ValueError; tracers pass."""
    if not _concrete(value):
        return value
    v = _real(value, name)
    if not (np.isfinite(v) and v >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return v


def whole(value, name: str, minimum: int = 0):
    """A concrete whole number >= ``minimum`` as a Python int (2.5, NaN and bools are errors); tracers pass."""
    if not _concrete(value):
        return value
    v = _real(value, name)
    if not (np.isfinite(v) and v == int(v) and v >= minimum):
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    return int(v)


def seed(value: int) -> int:
    """A random seed: a non-negative integer (the CLI's ``--seed``), else ValueError."""
    if value < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {value}")
    return value


def flag(value, name: str) -> bool:
    """``value`` if it is a bool, else ValueError."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def count(value, name: str) -> int:
    """``value`` as an int if it is a whole number >= 1, else ValueError."""
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def temperature(value, name: str = "temperature") -> jax.Array | None:
    """A positive temperature (scalar or array, for vmapped sweeps), or None."""
    if value is None:
        return None
    return positive(value, name, " (or None for the vanilla gradient)" if name == "temperature" else "")


def choice(value: str, allowed: Sequence[str], name: str) -> str:
    """``value`` if it is one of ``allowed``, else a ValueError listing them."""
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}: use one of {', '.join(allowed)}")
    return value
