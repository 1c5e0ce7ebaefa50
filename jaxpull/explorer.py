"""The interactive explorer's request handlers, without any web framework.

``jaxpull app`` (``jaxpull/app.py``) wires these into a Gradio page; here they take plain
values and return arrays and text, so they are unit-tested directly. Every problem a user can
cause raises ``ValueError`` with one line that says what to change; the page shows it and the
server keeps running. Models are loaded once and every request reuses the same compiled
functions (temperature, label, step size and steps are traced arguments).
"""

from __future__ import annotations

import functools
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from jaxpull import checks, explain, images, io, models, store
from jaxpull.figures import normalize_cell
from jaxpull.gates import Gating
from jaxpull.model import Model

DEFAULT_LABEL = "efficientnet_lite0 (offline default)"
TOP1 = "top-1 of the image"
METHODS = ("excitation pullback", "vanilla gradient", "both")
STRIP_TEMPERATURES = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
MAX_STEPS = 100
# Larger uploads are shrunk (keeping the aspect ratio) before the 224x224 crop.
MAX_SIDE = 2048


def available_models(models_dir: Optional[str]) -> Dict[str, str]:
    """Display name -> model source: the offline default plus every ``*.safetensors`` in ``models_dir``."""
    found = {DEFAULT_LABEL: store.DEFAULT_MODEL}
    if models_dir:
        root = Path(models_dir)
        if not root.is_dir():
            raise ValueError(f"models folder {str(root)!r} does not exist: pass --models DIR with converted files")
        for f in sorted(root.glob("*.safetensors")):
            found[f.stem] = str(f)
    return found


def read_upload(path: str) -> Tuple[np.ndarray, str]:
    """An uploaded file -> ``(224, 224, 3)`` in [-1, 1] and a note (non-empty if it was shrunk)."""
    try:
        with Image.open(path) as im:
            size = im.size
            im.draft("RGB", (MAX_SIDE, MAX_SIDE))  # JPEG: decode at a reduced scale directly
            im.load()
            note = ""
            if max(im.size) > MAX_SIDE or max(size) > MAX_SIDE:
                im.thumbnail((MAX_SIDE, MAX_SIDE))
                note = f"the upload was {size[0]}x{size[1]} pixels: downscaled before the 224x224 crop"
            return images.preprocess(im), note
    except Image.DecompressionBombError:
        raise ValueError(
            f"the upload is too large to decode safely (over {2 * Image.MAX_IMAGE_PIXELS:,} pixels): use a smaller image"
        ) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"the upload is not an image this app can read ({type(e).__name__}): upload a JPEG or PNG") from None


@functools.partial(jax.jit, static_argnames=("gate", "pool_weights"))
def strip_core(model: Model, x: jax.Array, targets: jax.Array, temperatures: jax.Array, steps, alpha, eps,
               gate: str = "sigmoid", pool_weights: str = "soft") -> jax.Array:
    """x_K - x0 for every temperature in one vmapped call: ``(1, H, W, 3)``, ``(1, 1)``, ``(T,)`` -> ``(T, H, W, 3)``."""

    def one(t):
        gating = Gating(t, t, gate, pool_weights)
        return explain.ascent_core(model, x, targets, gating, steps, alpha, eps, jnp.float32(0.0))[0, 0] - x[0]

    return jax.vmap(one)(temperatures)


@dataclass
class Settings:
    """One request's numbers, checked by :meth:`Explorer.settings`."""

    steps: int
    alpha: float
    eps: Optional[float]
    temperature: float
    pool_temperature: Optional[float]


def _number(value, name: str, low: float, high: float, optional: bool = False) -> Optional[float]:
    if value is None or (isinstance(value, str) and not value.strip()):
        if optional:
            return None
        raise ValueError(f"{name} is empty: enter a number in ({low:g}, {high:g}]")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not (low < v <= high):
        raise ValueError(f"{name} = {v:g} is out of range: use a number in ({low:g}, {high:g}]")
    return v


def _caption(tile: np.ndarray, text: str) -> np.ndarray:
    """A uint8 tile with ``text`` on a white band above it."""
    band = Image.new("RGB", (tile.shape[1], 18), "white")
    ImageDraw.Draw(band).text((4, 3), text[:40], fill="black")
    return np.concatenate([np.asarray(band), tile], axis=0)


class Explorer:
    """The explorer's state (models by display name, loaded lazily and kept) and its handlers."""

    def __init__(self, models_dir: Optional[str] = None, output_dir: Optional[str] = None):
        self.models = available_models(models_dir)
        self._loaded: Dict[str, Model] = {}
        self._lock = threading.Lock()
        self.output_dir = Path(output_dir or tempfile.mkdtemp(prefix="jaxpull-app-"))

    # ---- inputs --------------------------------------------------------------------------

    def model(self, name: str) -> Model:
        """The model shown as ``name`` (loaded on first use); ValueError if it is unknown or its file is gone."""
        if name not in self.models:
            raise ValueError(f"unknown model {name!r}: choose one of {', '.join(self.models)}")
        with self._lock:
            if name not in self._loaded:
                source = self.models[name]
                if source != store.DEFAULT_MODEL and not Path(source).is_file():
                    raise ValueError(f"model file {source} is missing: convert it again or restart the app")
                self._loaded[name] = store.resolve(source, log=lambda msg: None)
            return self._loaded[name]

    def class_choices(self, name: str) -> List[str]:
        """``["top-1 of the image", "0: tench", ...]`` for the searchable target list."""
        m = self.model(name)
        return [TOP1] + [f"{i}: {m.class_name(i)}" for i in range(m.num_classes)]

    def has_max_pools(self, name: str) -> bool:
        """Whether the model has max-pools (the pool temperature applies)."""
        return models.get(self.model(name).arch).max_pools

    def image(self, upload: Optional[str], sample: Optional[str]) -> Tuple[np.ndarray, str]:
        """The input ``(1, 224, 224, 3)`` and a note: the upload if there is one, else the sample photo."""
        if upload:
            x, note = read_upload(upload)
            return x[None], note
        if not sample:
            raise ValueError("no image: upload one or pick a sample photo")
        return images.load_image(images.sample_paths([sample])[0])[None], ""

    def target(self, model: Model, choice: Optional[str], logits: np.ndarray) -> int:
        """The target index from the list's entry (``"207: golden retriever"``), a name, or top-1."""
        if not choice or choice == TOP1:
            return int(np.argmax(logits))
        head = choice.split(":", 1)[0].strip()
        return model.label(head if head.isdigit() else choice)

    @staticmethod
    def settings(steps, alpha, eps, temperature, pool_temperature) -> Settings:
        """Check the numbers of a request (one-line ValueError naming the field and its range)."""
        s = _number(steps, "steps", -1, MAX_STEPS)
        if s != int(s):
            raise ValueError(f"steps must be a whole number, got {s:g}")
        return Settings(
            int(s), _number(alpha, "alpha", 0, 1e6), _number(eps, "eps", 0, 1e6, optional=True),
            _number(temperature, "temperature", 0, 1e3), _number(pool_temperature, "pool temperature", 0, 1e3, optional=True),
        )

    # ---- requests ------------------------------------------------------------------------

    def top5(self, model: Model, logits: np.ndarray) -> Dict[str, float]:
        """``{"tiger cat (282)": 0.38, ...}`` for the five most probable classes."""
        p = np.exp(logits - logits.max())
        p /= p.sum()
        return {f"{model.class_name(i)} ({i})": float(p[i]) for i in np.argsort(-p)[:5]}

    def explain(self, upload, sample, model_name, target, method, steps, alpha, eps, temperature, pool_temperature):
        """One explanation request.

        Returns ``(top5, picture, arrays_path, note)``: ``picture`` uint8 ``(rows * 242, 3 * 224, 3)``,
        per method a row of the clean image, the perturbed x_K and the normalised x_K - x0.
        """
        checks.choice(method, METHODS, "method")
        s = self.settings(steps, alpha, eps, temperature, pool_temperature)
        model = self.model(model_name)
        x, note = self.image(upload, sample)
        start = time.perf_counter()
        logits = np.asarray(model(x))[0]
        label = self.target(model, target, logits)
        chosen = ["excitation pullback", "vanilla gradient"] if method == "both" else [method]
        rows, arrays = [], {"x0": x[0], "target": np.int32(label)}
        for m in chosen:
            t = s.temperature if m == "excitation pullback" else None
            tp = s.pool_temperature if t is not None else None
            xk = np.asarray(explain.ascent(model, x, [label], steps=s.steps, alpha=s.alpha, eps=s.eps,
                                           temperature=t, pool_temperature=tp))[0, 0]
            key = "pullback" if t is not None else "vanilla"
            arrays[f"{key}_xk"], arrays[f"{key}_diff"] = xk, xk - x[0]
            tiles = [images.to_pixels(x[0]), images.to_pixels(xk), (normalize_cell(xk - x[0]) * 255).astype(np.uint8)]
            captions = ["clean x0", f"{m}: x_K", "x_K - x0 (normalised)"]
            rows.append(np.concatenate([_caption(tile, c) for tile, c in zip(tiles, captions)], axis=1))
        seconds = time.perf_counter() - start
        path = self.output_dir / f"jaxpull_{label}_{int(time.time() * 1000)}.npz"
        io.save_arrays(path, arrays)
        summary = f"target {model.class_name(label)} ({label}); {s.steps} steps, alpha {s.alpha:g}, eps {s.eps}, t {s.temperature:g}; {seconds:.2f} s"
        return self.top5(model, logits), np.concatenate(rows, axis=0), str(path), "; ".join(filter(None, [note, summary]))

    def strip(self, upload, sample, model_name, target, steps, alpha, eps, temperatures: Sequence[float] = STRIP_TEMPERATURES):
        """The temperature strip: x_K - x0 for each temperature, from one vmapped call.

        Returns ``(picture, note)``, ``picture`` uint8 ``(242, T * 224, 3)``.
        """
        s = self.settings(steps, alpha, eps, 1.0, None)
        model = self.model(model_name)
        x, note = self.image(upload, sample)
        label = self.target(model, target, np.asarray(model(x))[0])
        start = time.perf_counter()
        diffs = np.asarray(strip_core(
            model, jnp.asarray(x), jnp.array([[label]], jnp.int32), jnp.asarray(temperatures, jnp.float32),
            jnp.int32(s.steps), jnp.float32(s.alpha), jnp.float32(1e30 if s.eps is None else s.eps)))
        seconds = time.perf_counter() - start
        tiles = [_caption((normalize_cell(d) * 255).astype(np.uint8), f"t = {t:g}") for d, t in zip(diffs, temperatures)]
        summary = f"{len(temperatures)} temperatures in one vmapped call: {seconds:.2f} s"
        return np.concatenate(tiles, axis=1), "; ".join(filter(None, [note, summary]))
