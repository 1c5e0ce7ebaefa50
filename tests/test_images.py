"""Image loading: the paper's preprocessing, every PIL mode, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torchvision.transforms as T
from PIL import Image

from jaxpull.files import images


def photo(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


@pytest.mark.parametrize("w,h", [(400, 300), (300, 517), (257, 1000), (640, 427)])
def test_non_square_is_short_side_256_then_centre_crop_as_torchvision(w, h):
    img = photo(w, h)
    expected = np.asarray(T.CenterCrop(224)(T.Resize(256, interpolation=T.InterpolationMode.BILINEAR)(img)))
    np.testing.assert_array_equal(images.to_pixels(images.preprocess(img)), expected)


def test_square_is_resized_to_224():
    img = photo(500, 500)
    expected = np.asarray(img.resize((224, 224), Image.BILINEAR, reducing_gap=None))
    got = images.preprocess(img)
    assert got.shape == (224, 224, 3) and got.dtype == np.float32
    assert got.min() >= -1 and got.max() <= 1
    np.testing.assert_array_equal(images.to_pixels(got), expected)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "LA", "I;16"])
def test_every_mode_becomes_rgb(mode, tmp_path):
    img = photo(300, 240).convert("RGBA" if mode in ("LA",) else "RGB")
    img = img.convert(mode) if mode != "I;16" else img.convert("L").convert("I;16")
    path = tmp_path / ("x.tiff" if mode in ("CMYK", "I;16") else "x.png")
    img.save(path)
    x = images.load_image(path)
    assert x.shape == (224, 224, 3) and np.isfinite(x).all()


def test_exif_orientation_is_applied(tmp_path):
    img = photo(400, 300)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    img.save(tmp_path / "r.png", exif=exif)  # lossless, so the pixels can be compared exactly
    x = images.load_image(tmp_path / "r.png")
    upright = images.preprocess(img.transpose(Image.Transpose.ROTATE_270))  # 90 degrees clockwise
    np.testing.assert_array_equal(x, upright)
    assert not np.array_equal(x, images.preprocess(img))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF"])
def test_formats(fmt, tmp_path):
    path = tmp_path / f"x.{fmt.lower()}"
    photo(320, 240).save(path, format=fmt)
    assert images.load_image(path).shape == (224, 224, 3)


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        images.load_image(tmp_path / "missing.jpg")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.png.*empty"):
        images.load_image(tmp_path / "empty.png")
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read image .*text.jpg"):
        images.load_image(tmp_path / "text.jpg")
    photo(300, 200).save(tmp_path / "cut.jpg")
    data = (tmp_path / "cut.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="cut.jpg"):
        images.load_image(tmp_path / "cut.jpg")


def test_sample_photos_are_real_files():
    found = images.sample_images()
    assert {"grace_hopper", "chelsea", "coffee", "rocket"} <= set(found)
    with pytest.raises(ValueError, match="not available"):
        images.sample_paths(["nope"])
