"""Images in: files to ``(N, 224, 224, 3)`` float32 in [-1, 1], the paper's preprocessing.

RGB (EXIF orientation applied; grayscale, palette, RGBA and CMYK converted); a square image is
resized to 224x224, any other is resized so its short side is 256 (bilinear, antialiased) and
centre-cropped to 224x224. Pixels p map to x = 2 * p / 255 - 1.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

SIZE = 224
RESIZE = 256


def from_pixels(pixels) -> np.ndarray:
    """0-255 pixels (any shape) -> float32 in [-1, 1]."""
    return np.asarray(pixels, np.float32) / 127.5 - 1.0


def to_pixels(x) -> np.ndarray:
    """[-1, 1] -> uint8 pixels (clipped)."""
    return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def preprocess(image: Image.Image, size: int = SIZE, resize: int = RESIZE) -> np.ndarray:
    """A PIL image -> ``(size, size, 3)`` float32 in [-1, 1] (resize/crop as the paper)."""
    image = ImageOps.exif_transpose(image)
    if image.mode != "RGB":
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba)
        image = image.convert("RGB")
    w, h = image.size
    if w == h:
        image = image.resize((size, size), Image.BILINEAR, reducing_gap=None)
    else:
        # as torchvision's Resize(256) + CenterCrop(224): long side truncated, crop offsets rounded
        nw, nh = (resize, int(resize * h / w)) if w < h else (int(resize * w / h), resize)
        image = image.resize((nw, nh), Image.BILINEAR)
        left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
        image = image.crop((left, top, left + size, top + size))
    return from_pixels(np.asarray(image, np.uint8))


def load_image(path: Union[str, os.PathLike]) -> np.ndarray:
    """Read one image file -> ``(224, 224, 3)`` in [-1, 1]; ValueError naming the file if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} not found")
    if path.stat().st_size == 0:
        raise ValueError(f"image {str(path)!r} is empty")
    try:
        with Image.open(path) as image:
            image.load()
            return preprocess(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {str(path)!r}: {e}") from None


def load_images(paths: Sequence[Union[str, os.PathLike]]) -> np.ndarray:
    """Several image files -> ``(N, 224, 224, 3)`` in [-1, 1]."""
    if not paths:
        raise ValueError("no images given")
    return np.stack([load_image(p) for p in paths])


def sample_images() -> Dict[str, Path]:
    """Real photos shipped inside installed packages (no download): name -> file path.

    matplotlib's ``grace_hopper.jpg`` and scikit-image's chelsea, coffee, rocket and astronaut,
    where those packages are installed.
    """
    found: Dict[str, Path] = {}
    try:
        import matplotlib

        p = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
        if p.is_file():
            found["grace_hopper"] = p
    except ImportError:
        pass
    found.update(_skimage_photos((("chelsea", "chelsea.png"), ("coffee", "coffee.png"), ("rocket", "rocket.jpg"),
                                  ("astronaut", "astronaut.png"))))
    return found


def _skimage_photos(files: Sequence[Tuple[str, str]]) -> Dict[str, Path]:
    """name -> path of those of scikit-image's data ``files`` that are installed."""
    try:
        import skimage.data
    except ImportError:
        return {}
    paths = {name: Path(skimage.data.data_dir) / file for name, file in files}
    return {name: p for name, p in paths.items() if p.is_file()}


# More real photos from scikit-image for evaluations (file name in skimage.data's folder).
# Synthetic images (logos, text, test patterns) are left out.
_MORE_PHOTOS = (
    ("camera", "camera.png"), ("motorcycle", "motorcycle_left.png"), ("clock", "clock_motion.png"),
    ("coins", "coins.png"), ("moon", "moon.png"), ("hubble", "hubble_deep_field.jpg"), ("ihc", "ihc.png"),
)


def evaluation_photos() -> Dict[str, Path]:
    """The sample photos plus seven more of scikit-image's real photographs: name -> path."""
    return {**sample_images(), **_skimage_photos(_MORE_PHOTOS)}


def sample_paths(names: Sequence[str] = ()) -> List[Path]:
    """Paths of the named sample photos (all if none named); ValueError if one is not available."""
    available = sample_images()
    if not available:
        raise ValueError("no sample photos found: pip install matplotlib scikit-image (or 'jaxpull[demo]')")
    names = list(names) or list(available)
    missing = [n for n in names if n not in available]
    if missing:
        raise ValueError(f"sample photo(s) {', '.join(missing)} not available: choose from {', '.join(available)}")
    return [available[n] for n in names]
