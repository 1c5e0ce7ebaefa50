"""The interactive explorer's request handlers, without any web framework.

``jaxpull app`` (``jaxpull/shell/app.py``) wires these into a Gradio page; here they take plain
values and return arrays and text, so they are unit-tested directly. Every problem a user can
cause raises ``ValueError`` with one line that says what to change; the page shows it and the
server keeps running. Models are loaded once and every request reuses the same compiled
functions (temperature, label, step size and steps are traced arguments).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from jaxpull.core import checks, models, pullback, settings
from jaxpull.core.model import Model
from jaxpull.core.preprocessing import Preprocessing
from jaxpull.core.rules import Rules
from jaxpull.core.settings import DEFAULT_RULES, SETTINGS, Ascent
from jaxpull.files import cache, images, outputs
from jaxpull.shell.figures import normalize_cell
from jaxpull.shell.finite import changed_settings, require_finite

DEFAULT_LABEL = f"{cache.DEFAULT_MODEL} (offline default)"
TOP1 = "top-1 of the image"
METHODS = ("excitation pullback", "vanilla gradient", "both")
STRIP_TEMPERATURES = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
MAX_STEPS = 100
# Larger uploads are shrunk (keeping the aspect ratio) before the 224x224 crop.
MAX_SIDE = 2048
# The per-request .npz files kept in the output folder (older ones are deleted).
KEEP_ARRAYS = 20
# The largest upload accepted (the page refuses larger ones before they arrive; read_upload too).
MAX_UPLOAD_BYTES = 50 * 2**20


def available_models(models_dir: str | None) -> dict[str, str]:
    """Display name -> model source: the offline default plus every ``*.safetensors`` in ``models_dir``."""
    found = {DEFAULT_LABEL: cache.DEFAULT_MODEL}
    if models_dir:
        root = Path(models_dir)
        if not root.is_dir():
            raise ValueError(f"models folder {str(root)!r} does not exist: pass --models DIR with converted files")
        for f in sorted(root.glob("*.safetensors")):
            found[f.stem] = str(f)
    return found


def read_upload(path: str, preprocessing: Preprocessing = Preprocessing()) -> tuple[np.ndarray, str]:
    """An uploaded file -> ``(S, S, 3)`` in [-1, 1] (S the model's crop size, 224 by default) and a
    note (non-empty if it was shrunk).

    Opened with :func:`jaxpull.files.images.open_image` (its size limits and greyscale-depth rules),
    so a file that is no image, or is too large, gets this app's own one-line message.
    """
    if not path or not Path(path).is_file():
        raise ValueError("the upload is missing on the server: upload the image again")
    size = Path(path).stat().st_size
    if size > MAX_UPLOAD_BYTES:
        raise ValueError(
            f"the upload is {size / 2**20:.0f} MB, more than this app takes ({MAX_UPLOAD_BYTES // 2**20} MB): "
            "upload a smaller file"
        )
    try:
        with warnings.catch_warnings(), Image.open(path) as probe:  # reads the header only
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # handled by open_image
            size = probe.size
    except Image.DecompressionBombError:
        raise ValueError(
            f"the upload is too large to decode safely (over {2 * Image.MAX_IMAGE_PIXELS:,} pixels): use a smaller image"
        ) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(
            f"the upload is not an image this app can read ({type(e).__name__}): upload a JPEG or PNG"
        ) from None
    try:
        with images.open_image(path) as im:
            note = ""
            if max(im.size) > MAX_SIDE or max(size) > MAX_SIDE:
                im.thumbnail((MAX_SIDE, MAX_SIDE))
                crop = preprocessing.crop_size
                note = f"the upload was {size[0]}x{size[1]} pixels: downscaled before the {crop}x{crop} crop"
            return images.preprocess(im, **preprocessing.image_options), note
    except images.ImageError as e:
        raise ValueError(f"the upload cannot be used: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(
            f"the upload is not an image this app can read ({type(e).__name__}): upload a JPEG or PNG"
        ) from None


@jax.jit
def strip_core(model: Model, x: jax.Array, targets: jax.Array, rules: Rules, ascent: Ascent) -> jax.Array:
    """x_K - x0 for every ReLU temperature in one vmapped call: ``rules.relu.temperature`` ``(T,)``,
    ``x`` ``(1, H, W, 3)``, ``targets`` ``(1, 1)`` -> ``(T, H, W, 3)``."""

    def one(r: Rules) -> jax.Array:
        return pullback.ascent_core(model, x, targets, r, ascent)[0, 0] - x[0]

    return jax.vmap(one, in_axes=(rules.batch_axes(),))(rules)


# The form's fields: every rule and ascent setting (jaxpull.core.settings.SETTINGS), in that order;
# the page builds one control per entry, the handlers take them by name.
FORM = tuple(SETTINGS)


class Request(NamedTuple):
    """One request's settings, checked by :meth:`Explorer.settings`."""

    rules: Rules
    ascent: Ascent


def form_value(name: str, value):
    """A form field's value as its setting takes it: an empty number is None where the setting allows
    None (eps: no projection), else a one-line error; numbers typed as text become floats."""
    s = SETTINGS[name]
    if s.kind != "number":
        return value
    if value is None or (isinstance(value, str) and not value.strip()):
        if s.field.metadata["optional"]:
            return None
        raise ValueError(f"{name} is empty: enter a number")
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    return value


def preset_form(name: str) -> dict[str, object]:
    """Every form field's value in the preset ``name`` (what the page shows when it is chosen)."""
    p = settings.preset(name)
    return {n: s.get(p.ascent if s.part == "ascent" else getattr(p.rules, s.part)) for n, s in SETTINGS.items()}


def _caption(tile: np.ndarray, text: str) -> np.ndarray:
    """A uint8 tile with ``text`` on a white band above it."""
    band = Image.new("RGB", (tile.shape[1], 18), "white")
    ImageDraw.Draw(band).text((4, 3), text[:40], fill="black")
    return np.concatenate([np.asarray(band), tile], axis=0)


class Explorer:
    """The explorer's state (models by display name, loaded lazily and kept) and its handlers."""

    def __init__(self, models_dir: str | None = None, output_dir: str | None = None):
        self.models = available_models(models_dir)
        self._loaded: dict[str, Model] = {}
        self._lock = threading.Lock()
        self._output_dir = Path(output_dir) if output_dir else None

    @property
    def output_dir(self) -> Path:
        """Where the per-request ``.npz`` files go (the last ``KEEP_ARRAYS`` are kept).

        Without an ``output_dir``, a ``jaxpull-app-*`` temporary folder made on first use and
        removed by :meth:`close` or at exit, so a failed start leaves nothing behind.
        """
        if self._output_dir is None:
            self._output_dir = Path(tempfile.mkdtemp(prefix="jaxpull-app-"))
            self._owned = self._output_dir
            atexit.register(self.close)
        return self._output_dir

    def close(self) -> None:
        """Remove the temporary output folder this explorer made (a given ``output_dir`` stays)."""
        owned = getattr(self, "_owned", None)
        if owned is not None:
            shutil.rmtree(owned, ignore_errors=True)
            self._owned = self._output_dir = None

    def _save_arrays(self, path: Path, arrays: dict[str, np.ndarray]) -> None:
        outputs.save_arrays(path, arrays)
        saved = sorted(path.parent.glob("jaxpull_*.npz"), key=lambda f: f.stat().st_mtime_ns)
        for old in saved[:-KEEP_ARRAYS]:
            old.unlink(missing_ok=True)

    # ---- inputs --------------------------------------------------------------------------

    def model(self, name: str) -> Model:
        """The model shown as ``name`` (loaded on first use); ValueError if it is unknown or its file is gone."""
        if name not in self.models:
            raise ValueError(f"unknown model {name!r}: choose one of {', '.join(self.models)}")
        with self._lock:
            if name not in self._loaded:
                source = self.models[name]
                if source != cache.DEFAULT_MODEL and not Path(source).is_file():
                    raise ValueError(f"model file {source} is missing: convert it again or restart the app")
                self._loaded[name] = cache.resolve(source, log=lambda msg: None)
            return self._loaded[name]

    def class_choices(self, name: str) -> list[str]:
        """``["top-1 of the image", "0: tench", ...]`` for the searchable target list."""
        m = self.model(name)
        return [TOP1] + [f"{i}: {m.class_name(i)}" for i in range(m.num_classes)]

    def has_max_pools(self, name: str) -> bool:
        """Whether the model has max-pools (the pool temperature applies)."""
        return models.get(self.model(name).arch).max_pools

    def image(
        self, upload: str | None, sample: str | None, preprocessing: Preprocessing = Preprocessing()
    ) -> tuple[np.ndarray, str]:
        """The input ``(1, S, S, 3)`` (S: ``preprocessing.crop_size``, the model's) and a note: the
        upload if there is one, else the sample photo."""
        if upload:
            x, note = read_upload(upload, preprocessing)
            return x[None], note
        if not sample:
            raise ValueError("no image: upload one or pick a sample photo")
        return images.load_image(images.sample_paths([sample])[0], **preprocessing.image_options)[None], ""

    def target(self, model: Model, choice: str | None, logits: np.ndarray) -> int:
        """The target index from the list's entry (``"207: golden retriever"``), a name, or top-1."""
        if not choice or choice == TOP1:
            return int(np.argmax(logits))
        head = choice.split(":", 1)[0].strip()
        return model.label(head if head.isdigit() else choice)

    @staticmethod
    def settings(rules: str = DEFAULT_RULES, **form) -> Request:
        """Check a request's fields (by setting name, any subset; the others are the preset's) with
        :mod:`jaxpull.core.settings`: a one-line ValueError naming the field."""
        rule_set, ascent = settings.resolve_both(rules, **{k: form_value(k, v) for k, v in form.items()})
        if ascent.steps > MAX_STEPS:
            raise ValueError(f"steps = {ascent.steps} is more than this app runs: use at most {MAX_STEPS}")
        return Request(rule_set, ascent)

    # ---- requests ------------------------------------------------------------------------

    def top5(self, model: Model, logits: np.ndarray) -> dict[str, float]:
        """``{"tiger cat (282)": 0.38, ...}`` for the five most probable classes."""
        p = np.exp(logits - logits.max())
        p /= p.sum()
        return {f"{model.class_name(i)} ({i})": float(p[i]) for i in np.argsort(-p)[:5]}

    def explain(self, upload, sample, model_name, target, method, rules: str = DEFAULT_RULES, **form):
        """One explanation request (``form``: rule and ascent settings by name, :data:`FORM`).

        Returns ``(top5, picture, arrays_path, note)``: ``picture`` uint8 ``(rows * 242, 3 * 224, 3)``,
        per method a row of the clean image, the perturbed x_K and the normalised x_K - x0.
        """
        checks.choice(method, METHODS, "method")
        s = self.settings(rules, **form)
        model = self.model(model_name)
        x, note = self.image(upload, sample, model.preprocessing)
        start = time.perf_counter()
        logits = np.asarray(model(x))[0]
        label = self.target(model, target, logits)
        chosen = ["excitation pullback", "vanilla gradient"] if method == "both" else [method]
        rows, arrays = [], {"x0": x[0], "target": np.int32(label)}
        for m in chosen:
            rule_set = s.rules if m == "excitation pullback" else settings.VANILLA
            xk = np.asarray(
                pullback.ascent_core(model, jnp.asarray(x), jnp.array([[label]], jnp.int32), rule_set, s.ascent)
            )[0, 0]
            require_finite(xk, f"the {m} ascent", changed_settings(s.rules, s.ascent, rules))
            key = "pullback" if m == "excitation pullback" else "vanilla"
            arrays[f"{key}_xk"], arrays[f"{key}_diff"] = xk, xk - x[0]
            tiles = [images.to_pixels(x[0]), images.to_pixels(xk), (normalize_cell(xk - x[0]) * 255).astype(np.uint8)]
            captions = ["clean x0", f"{m}: x_K", "x_K - x0 (normalised)"]
            rows.append(np.concatenate([_caption(tile, c) for tile, c in zip(tiles, captions, strict=True)], axis=1))
        seconds = time.perf_counter() - start
        path = self.output_dir / f"jaxpull_{label}_{int(time.time() * 1000)}.npz"
        self._save_arrays(path, arrays)
        a = s.ascent
        summary = (
            f"target {model.class_name(label)} ({label}); {a.steps} steps, alpha {a.alpha:g}, eps {a.eps}, "
            f"t {s.rules.relu.temperature:g}; {seconds:.2f} s"
        )
        return (
            self.top5(model, logits),
            np.concatenate(rows, axis=0),
            str(path),
            "; ".join(filter(None, [note, summary])),
        )

    def strip(
        self,
        upload,
        sample,
        model_name,
        target,
        rules: str = DEFAULT_RULES,
        temperatures: Sequence[float] = STRIP_TEMPERATURES,
        **form,
    ):
        """The temperature strip: x_K - x0 for each ReLU temperature t, from one vmapped call; every
        other setting is the request's (``form``). Returns ``(picture, note)``, ``picture`` uint8
        ``(242, T * 224, 3)``."""
        form.pop("temperature", None)  # the strip's own
        s = self.settings(rules, **form)
        many = s.rules.replace(temperature=np.asarray(temperatures, np.float32))
        model = self.model(model_name)
        x, note = self.image(upload, sample, model.preprocessing)
        label = self.target(model, target, np.asarray(model(x))[0])
        start = time.perf_counter()
        diffs = np.asarray(strip_core(model, jnp.asarray(x), jnp.array([[label]], jnp.int32), many, s.ascent))
        require_finite(diffs, "the temperature strip", changed_settings(s.rules, s.ascent, rules))
        seconds = time.perf_counter() - start
        tiles = [
            _caption((normalize_cell(d) * 255).astype(np.uint8), f"t = {t:g}")
            for d, t in zip(diffs, temperatures, strict=True)
        ]
        summary = f"{len(temperatures)} temperatures in one vmapped call: {seconds:.2f} s"
        return np.concatenate(tiles, axis=1), "; ".join(filter(None, [note, summary]))
