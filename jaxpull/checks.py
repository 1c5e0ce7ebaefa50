"""Input checks of the public functions: one clear error naming the problem and its fix.

Checks run on concrete values only; inside ``jax.jit`` / ``jax.vmap`` tracers pass through.
"""

from __future__ import annotations

from typing import Optional, Sequence

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
            "(for 0-255 pixels use jaxpull.images.from_pixels)"
        )
    if _concrete(x):
        peak = float(jnp.max(jnp.abs(x)))
        if not np.isfinite(peak):
            raise ValueError("images contain NaN or infinity")
        if peak > _RANGE_LIMIT:
            raise ValueError(
                f"images must be in [-1, 1], got values up to {peak:g} "
                "(0-255 pixels? use x / 127.5 - 1 or jaxpull.images.from_pixels)"
            )
    return jnp.asarray(x, jnp.float32) if x.dtype != jnp.float32 else jnp.asarray(x)


def label(value, num_classes: int, class_names: Sequence[str] = ()) -> int:
    """A class index from an int (or integer string) or a class name; ValueError if neither."""
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
        if not np.issubdtype(t.dtype, np.integer):
            raise ValueError(f"targets must be integer class indices, got dtype {t.dtype}")
        bad = t[(t < 0) | (t >= num_classes)]
        if bad.size:
            raise ValueError(f"target label {int(bad[0])} is out of range: labels must be in [0, {num_classes})")
    return jnp.asarray(t, jnp.int32)


def positive(value, name: str, hint: str = "") -> jax.Array:
    """``value`` (scalar or array) as float32 if every entry is positive and finite, else ValueError."""
    if _concrete(value):
        a = np.asarray(value, dtype=np.float64)
        if a.size == 0 or not np.all(np.isfinite(a)) or np.any(a <= 0):
            raise ValueError(f"{name} must be positive and finite, got {value!r}{hint}")
    return jnp.asarray(value, jnp.float32)


def count(value, name: str) -> int:
    """``value`` as an int if it is a whole number >= 1, else ValueError."""
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def temperature(value, name: str = "temperature") -> Optional[jax.Array]:
    """A positive temperature (scalar or array, for vmapped sweeps), or None."""
    if value is None:
        return None
    return positive(value, name, f" (use {name}=None for the vanilla gradient)" if name == "temperature" else "")


def choice(value: str, allowed: Sequence[str], name: str) -> str:
    """``value`` if it is one of ``allowed``, else a ValueError listing them."""
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}: use one of {', '.join(allowed)}")
    return value
