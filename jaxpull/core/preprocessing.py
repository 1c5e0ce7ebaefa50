"""How images are prepared for a model's weights: torchvision's ``weights.transforms()`` sizes.

A square image is resized straight to ``crop_size`` x ``crop_size`` (the paper's rule); any
other is resized so its short side is ``resize_size`` and centre-cropped to ``crop_size``.
Most ImageNet weights use 256 / 224 (the paper's); Inception-v3's use 342 / 299. A converted
file records these (``crop_size``, ``resize_size``, ``interpolation``); files written before
they were recorded get the defaults.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import NamedTuple

INTERPOLATIONS = ("bilinear", "bicubic")
# Every image size in pixels, the converter's parity check and a model file's crop and resize
# sizes alike: every supported architecture runs at 32 (their pooling stages need that much);
# torchvision's largest weights expect 600; beyond 1024 a size only costs memory (a model file
# claiming 100000 would make `explain` allocate tens of GB).
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 1024


class Preprocessing(NamedTuple):
    """Resize and crop sizes (pixels) and the resampling filter of a model's input images."""

    crop_size: int = 224
    resize_size: int = 256
    interpolation: str = "bilinear"

    def check(self) -> Preprocessing:
        """Return ``self``; ValueError naming the bad value otherwise."""
        for name in ("crop_size", "resize_size"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, numbers.Integral)
                or not MIN_IMAGE_SIZE <= int(value) <= MAX_IMAGE_SIZE
            ):
                raise ValueError(
                    f"{name} must be a whole number of pixels in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {value!r}"
                )
        if self.resize_size < self.crop_size:
            raise ValueError(
                f"resize_size {self.resize_size} is smaller than crop_size {self.crop_size}: "
                "the centre crop must fit in the resized image"
            )
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {self.interpolation!r}: use one of {', '.join(INTERPOLATIONS)}")
        return self

    def to_metadata(self) -> dict[str, str]:
        """The file metadata entries (strings)."""
        return {
            "crop_size": str(self.crop_size),
            "resize_size": str(self.resize_size),
            "interpolation": self.interpolation,
        }

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str]) -> Preprocessing:
        """Read the entries of :meth:`to_metadata` (defaults where absent); ValueError if malformed."""
        default = cls()
        try:
            crop = int(meta.get("crop_size", default.crop_size))
            resize = int(meta.get("resize_size", default.resize_size))
        except ValueError:
            raise ValueError(
                f"crop_size / resize_size must be whole numbers, got "
                f"{meta.get('crop_size')!r} / {meta.get('resize_size')!r}"
            ) from None
        return cls(crop, resize, meta.get("interpolation", default.interpolation)).check()

    @property
    def image_options(self) -> dict[str, object]:
        """Keyword arguments of ``jaxpull.files.images.load_image(s)``: ``size``, ``resize``, ``interpolation``."""
        return {"size": self.crop_size, "resize": self.resize_size, "interpolation": self.interpolation}
