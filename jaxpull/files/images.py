"""Images in: files to ``(N, 224, 224, 3)`` float32 in [-1, 1], the paper's preprocessing.

RGB (EXIF orientation applied; grayscale, palette, RGBA and CMYK converted); a square image is
resized to 224x224, any other is resized so its short side is 256 (bilinear, antialiased) and
centre-cropped to 224x224. Pixels p map to x = 2 * p / 255 - 1.

Deep greyscale modes are scaled to the 8-bit range first: 16-bit (``I;16``, ``I;16B``, ``I;16L``)
and 32-bit integer (``I``, as PIL opens 16-bit files) samples are read as 0-65535 and divided by
257; 32-bit float (``F``) samples are read as 0-1 and multiplied by 255. Samples outside those
ranges (or NaN) are refused with a message rather than clipped to white.

Size limits, decided so that no input makes the work or memory unbounded:

* more pixels than PIL's decompression-bomb limit (``2 * Image.MAX_IMAGE_PIXELS``, about 179
  million) is refused with one line before decoding;
* a JPEG larger than ``LARGE_SIDE`` pixels on a side is decoded at a reduced scale
  (``Image.draft``, DCT scaling) that keeps its short side at least twice the resize target,
  so a 12000x12000 photo costs a few MB; PIL's warning for such images is handled, not printed;
* any aspect ratio is accepted; where the short-side-256 image would exceed
  ``MAX_INTERMEDIATE`` pixels (aspect ratios beyond 256:1), the crop is taken *before*
  resizing: only the source box that becomes the 224x224 centre crop is resampled
  (``resize(box=...)``: the same pixel centres and filter as resizing the whole image and then
  cropping, equal within one 8-bit level), so a 12000x1 strip costs 224x224 output pixels, not
  the 3-gigabyte intermediate of resize-then-crop. Below that bound the result is
  bit-identical to torchvision's ``Resize(256)`` + ``CenterCrop(224)``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from jaxpull.core.preprocessing import Preprocessing

SIZE = 224
RESIZE = 256
RESAMPLING = {
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
}  # names of jaxpull.core.preprocessing.INTERPOLATIONS
# JPEGs larger than this on a side are decoded at a reduced scale (see the module docstring).
LARGE_SIDE = 4096
# Above this many pixels, the short-side-256 image is never built: the crop's box is resampled.
MAX_INTERMEDIATE = 2**24


class ImageError(ValueError):
    """An image jaxpull refuses by its own rules (size limits, sample ranges); the message says why."""


def from_pixels(pixels) -> np.ndarray:
    """0-255 pixels (any shape) -> float32 in [-1, 1]."""
    return np.asarray(pixels, np.float32) / 127.5 - 1.0


def to_pixels(x) -> np.ndarray:
    """[-1, 1] -> uint8 pixels (clipped)."""
    return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def preprocess(
    image: Image.Image, size: int = SIZE, resize: int = RESIZE, interpolation: str = "bilinear"
) -> np.ndarray:
    """A PIL image -> ``(size, size, 3)`` float32 in [-1, 1] (resize/crop as the paper; a model's
    own sizes are ``model.preprocessing.image_options``: Inception-v3's 342 / 299)."""
    Preprocessing(size, resize, interpolation).check()
    resample = RESAMPLING[interpolation]
    image = _to_8bit(ImageOps.exif_transpose(image))
    if image.mode != "RGB":
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba)
        image = image.convert("RGB")
    w, h = image.size
    if w == h:
        image = image.resize((size, size), resample, reducing_gap=None)
    else:
        # as torchvision's Resize(256) + CenterCrop(224): long side truncated, crop offsets rounded
        nw, nh = (resize, int(resize * h / w)) if w < h else (int(resize * w / h), resize)
        left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
        if nw * nh <= MAX_INTERMEDIATE:  # bit-identical to torchvision's Resize + CenterCrop
            image = image.resize((nw, nh), resample).crop((left, top, left + size, top + size))
        else:  # crop first: resample only the source box that becomes the crop (same pixel centres)
            sx, sy = w / nw, h / nh
            box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
            image = image.resize((size, size), resample, box=box)
    return from_pixels(np.asarray(image, np.uint8))


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit greyscale (``I;16*``, ``I``, ``F``) -> 8-bit ``L``; other modes unchanged."""
    if image.mode.startswith("I"):
        a, top, unit = np.asarray(image).astype(np.float64), 65535.0, 257.0
    elif image.mode == "F":
        a, top, unit = np.asarray(image).astype(np.float64), 1.0, 1 / 255
    else:
        return image
    if a.size and (not np.isfinite(a).all() or a.min() < 0 or a.max() > top):
        raise ImageError(
            f"mode {image.mode} samples must be in [0, {top:g}], got [{a.min():g}, {a.max():g}]: save the image as 8-bit"
        )
    return Image.fromarray(np.round(a / unit).astype(np.uint8), "L")


def open_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image file within the size limits of the module docstring (PIL errors propagate).

    Raises:
      ImageError: for more pixels than PIL's decompression-bomb limit.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # handled: see LARGE_SIDE
        try:
            image = Image.open(path)
        except Image.DecompressionBombError:
            raise ImageError(
                f"it has more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels (a decompression bomb?): use a smaller image"
            ) from None
        w, h = image.size
        if max(w, h) > LARGE_SIDE and image.format == "JPEG":
            scale = max(1.0, min(w, h) / (2 * RESIZE))
            image.draft(None, (int(w / scale), int(h / scale)))
        image.load()
    return image


def load_image(
    path: str | os.PathLike, size: int = SIZE, resize: int = RESIZE, interpolation: str = "bilinear"
) -> np.ndarray:
    """Read one image file -> ``(size, size, 3)`` in [-1, 1] (see ``preprocess``); ValueError
    naming the file if unreadable."""
    Preprocessing(size, resize, interpolation).check()
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"image {str(path)!r} is a directory: give image files")
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} not found")
    if path.stat().st_size == 0:
        raise ValueError(f"image {str(path)!r} is empty")
    try:
        with open_image(path) as image:
            return preprocess(image, size, resize, interpolation)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {str(path)!r}: {e}") from None


def load_images(
    paths: Sequence[str | os.PathLike], size: int = SIZE, resize: int = RESIZE, interpolation: str = "bilinear"
) -> np.ndarray:
    """Several image files -> ``(N, size, size, 3)`` in [-1, 1] (defaults: the paper's 224 / 256)."""
    if not paths:
        raise ValueError("no images given")
    return np.stack([load_image(p, size, resize, interpolation) for p in paths])


def sample_images() -> dict[str, Path]:
    """Real photos shipped inside installed packages (no download): name -> file path.

    matplotlib's ``grace_hopper.jpg`` and scikit-image's chelsea, coffee, rocket and astronaut,
    where those packages are installed.
    """
    found = _matplotlib_photos((("grace_hopper", "grace_hopper.jpg"),))
    found.update(
        _skimage_photos(
            (
                ("chelsea", "chelsea.png"),
                ("coffee", "coffee.png"),
                ("rocket", "rocket.jpg"),
                ("astronaut", "astronaut.png"),
            )
        )
    )
    return found


def _matplotlib_photos(files: Sequence[tuple[str, str]]) -> dict[str, Path]:
    """name -> path of those of matplotlib's ``sample_data`` ``files`` that are installed."""
    try:
        import matplotlib
    except ImportError:
        return {}
    paths = {name: Path(matplotlib.get_data_path()) / "sample_data" / file for name, file in files}
    return {name: p for name, p in paths.items() if p.is_file()}


def _skimage_photos(files: Sequence[tuple[str, str]]) -> dict[str, Path]:
    """name -> path of those of scikit-image's data ``files`` that are installed."""
    try:
        import skimage.data
    except ImportError:
        return {}
    paths = {name: Path(skimage.data.data_dir) / file for name, file in files}
    return {name: p for name, p in paths.items() if p.is_file()}


# More real photos from scikit-image for evaluations (file name in skimage.data's folder).
# Synthetic images (logos, text, test patterns, binary silhouettes) are left out, and so are
# motorcycle_right (the other half of motorcycle_left's stereo pair: not an independent photo)
# and the grayscale texture crops (brick, grass, gravel).
_MORE_PHOTOS = (
    ("camera", "camera.png"),
    ("motorcycle", "motorcycle_left.png"),
    ("clock", "clock_motion.png"),
    ("coins", "coins.png"),
    ("moon", "moon.png"),
    ("hubble", "hubble_deep_field.jpg"),
    ("ihc", "ihc.png"),
    ("retina", "retina.jpg"),
)


def _package_photos() -> dict[str, Path]:
    """matplotlib's photo of a tea pack and scikit-learn's ``load_sample_images`` (china, flower),
    where those packages are installed."""
    found = _matplotlib_photos((("tea_pack", "Minduka_Present_Blue_Pack.png"),))
    try:
        import sklearn.datasets
    except ImportError:
        return found
    folder = Path(sklearn.datasets.__file__).parent / "images"
    found.update({name: folder / f"{name}.jpg" for name in ("china", "flower") if (folder / f"{name}.jpg").is_file()})
    return found


def evaluation_photos() -> dict[str, Path]:
    """Every real photo found in installed packages: the sample photos, eight more of
    scikit-image's photographs, matplotlib's tea pack, scikit-learn's china and flower (name -> path)."""
    return {**sample_images(), **_skimage_photos(_MORE_PHOTOS), **_package_photos()}


def sample_paths(names: Sequence[str] = ()) -> list[Path]:
    """Paths of the named sample photos (all if none named); ValueError if one is not available."""
    available = sample_images()
    if not available:
        raise ValueError("no sample photos found: pip install matplotlib scikit-image (or 'jaxpull[demo]')")
    names = list(names) or list(available)
    missing = [n for n in names if n not in available]
    if missing:
        raise ValueError(f"sample photo(s) {', '.join(missing)} not available: choose from {', '.join(available)}")
    return [available[n] for n in names]
