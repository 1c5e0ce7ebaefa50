"""Images for ``jaxpull evaluate``: found once as paths, read batch by batch (bounded memory).

An :class:`ImageSource` holds the paths of the images and, for an ImageNet-style folder (one
subfolder per class), the class folder of each; :meth:`ImageSource.load` reads and preprocesses
the images of one batch only. :class:`ArraySource` puts an array in memory behind the same
interface (the Python API's ``evaluate(model, x)``).

Class folders are named by the class they hold, and :func:`folder_classes` maps each name to the
model's class index: a WordNet id (``n02123045``, the ImageNet validation layout) to its index
among ImageNet-1k's 1000 sorted ids (:data:`jaxpull.evaluation.imagenet_wnids.WNIDS`), a class
name of the model (``tabby``) or a class index (``281``) to that class. A folder holding a subset
of the classes is thereby scored against its own classes, not against its position among the
folders. Only a complete set of folders, one per class of the model, may carry other names: it
is numbered in sorted order, as torchvision's ``ImageFolder`` numbers a training set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from jaxpull.evaluation.imagenet_wnids import WNIDS

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
WNID = re.compile(r"n\d{8}")

Index = slice | Sequence[int] | np.ndarray


@dataclasses.dataclass(frozen=True)
class ImageSource:
    """Image files read on demand: ``paths`` ``(N,)``, each image's class ``folders`` ``(N,)`` (or
    None), and the model's preprocessing sizes (``jaxpull.files.images.load_images`` options)."""

    paths: tuple[Path, ...]
    folders: tuple[str, ...] | None = None
    size: int = 224
    resize: int = 256
    interpolation: str = "bilinear"

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> tuple[int, int, int]:
        """One image's shape ``(H, W, 3)``."""
        return (self.size, self.size, 3)

    @property
    def names(self) -> list[str]:
        """Each image's file name, with its class folder if it has one."""
        if self.folders is None:
            return [p.name for p in self.paths]
        return [f"{f}/{p.name}" for f, p in zip(self.folders, self.paths, strict=True)]

    def load(self, index: Index) -> np.ndarray:
        """The images at ``index`` (a slice or integer indices), ``(n, H, W, 3)`` in [-1, 1]."""
        from jaxpull.files import images

        picked = self.paths[index] if isinstance(index, slice) else [self.paths[int(i)] for i in index]
        return images.load_images(picked, self.size, self.resize, self.interpolation)

    def __getitem__(self, i: int) -> np.ndarray:
        """One image ``(H, W, 3)`` (what :func:`jaxpull.evaluation.mosaics.build_mosaics` indexes)."""
        return self.load([i])[0]

    def fingerprint(self) -> str:
        """sha256 of the images' names, bytes and preprocessing: a changed file changes it."""
        h = hashlib.sha256(repr((self.size, self.resize, self.interpolation)).encode())
        for name, path in zip(self.names, self.paths, strict=True):
            h.update(name.encode() + b"\0")
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class ArraySource:
    """Images already in memory, ``x`` ``(N, H, W, 3)`` in [-1, 1], behind :class:`ImageSource`'s interface."""

    x: np.ndarray
    folders: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.x)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])

    @property
    def names(self) -> list[str]:
        return [f"image {i}" for i in range(len(self.x))]

    def load(self, index: Index) -> np.ndarray:
        return self.x[index] if isinstance(index, slice) else self.x[np.asarray(index, int)]

    def __getitem__(self, i: int) -> np.ndarray:
        return self.x[int(i)]

    def fingerprint(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.x, np.float32).tobytes()).hexdigest()


def batches(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of ``size`` items covering ``range(n)``."""
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _images_in(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


def find_images(sources: Sequence[str | os.PathLike], limit: int | None = None) -> tuple[list[Path], list[str] | None]:
    """Image files from files and folders; a single folder of class subfolders (ImageNet style)
    also gives each image's class folder name.

    The images of class folders are taken class by class in turn (the first image of every
    class, then the second, ...), so that ``limit`` keeps the classes balanced; within a class
    the files are in sorted order. Returns ``(paths, folder names or None)``. Raises ValueError
    for a missing path or when no image is found.
    """
    for src in sources:
        if not Path(src).exists():
            raise ValueError(f"image path {str(src)!r} does not exist")
    paths: list[Path] = []
    folders: list[str] | None = None
    if len(sources) == 1 and Path(sources[0]).is_dir():
        subdirs = sorted(d for d in Path(sources[0]).iterdir() if d.is_dir())
        per_class = [(d.name, _images_in(d)) for d in subdirs]
        per_class = [(name, files) for name, files in per_class if files]
        if per_class:
            folders = []
            for rank in range(max(len(files) for _, files in per_class)):
                for name, files in per_class:
                    if rank < len(files):
                        paths.append(files[rank])
                        folders.append(name)
    if folders is None:
        for src in sources:
            p = Path(src)
            paths.extend(_images_in(p) if p.is_dir() else [p])
    if limit is not None:
        paths = paths[:limit]
        folders = None if folders is None else folders[:limit]
    if not paths:
        raise ValueError(f"no images found in {', '.join(map(str, sources))}")
    return paths, folders


def folder_classes(folders: Sequence[str], num_classes: int, class_names: Sequence[str] = ()) -> np.ndarray:
    """The class index ``(N,)`` of each image's class folder name (see the module docstring).

    A name is, in this order: a WordNet id of ImageNet-1k (for a 1000-class model), a class name
    of the model (exact, else case-insensitive if that is unique), or a class index. ValueError
    naming the first folder that is none of these, unless the folders are exactly one per class
    (numbered in sorted order, as ``ImageFolder`` does).
    """
    distinct = sorted(set(folders))
    exact = {name: i for i, name in reversed(list(enumerate(class_names)))}
    lower: dict = {}
    for i, name in enumerate(class_names):
        lower.setdefault(name.lower(), []).append(i)
    wnid_index = {w: i for i, w in enumerate(WNIDS)}
    mapping, unknown = {}, []
    for name in distinct:
        if WNID.fullmatch(name):
            if num_classes != len(WNIDS):
                raise ValueError(
                    f"class folder {name!r} is a WordNet id, but the model has {num_classes} classes, not "
                    f"ImageNet-1k's {len(WNIDS)}: name the folders by the model's class names or indices"
                )
            if name not in wnid_index:
                raise ValueError(
                    f"class folder {name!r} is not one of ImageNet-1k's 1000 WordNet ids: remove it or rename it "
                    "to a class name or index of the model"
                )
            mapping[name] = wnid_index[name]
        elif name in exact:
            mapping[name] = exact[name]
        elif len(lower.get(name.lower(), ())) == 1:
            mapping[name] = lower[name.lower()][0]
        elif len(lower.get(name.lower(), ())) > 1:
            raise ValueError(
                f"class folder {name!r} matches {len(lower[name.lower()])} class names of the model "
                f"(indices {', '.join(map(str, lower[name.lower()]))}): rename it to the exact name or the index"
            )
        elif name.isdigit() and int(name) < num_classes:
            mapping[name] = int(name)
        else:
            unknown.append(name)
    if unknown:
        if len(unknown) == len(distinct) == num_classes:  # a complete ImageFolder layout
            mapping = {name: i for i, name in enumerate(distinct)}
        else:
            names = "WordNet ids, " if num_classes == len(WNIDS) else ""
            raise ValueError(
                f"class folder {unknown[0]!r} is not a class of the model ({len(unknown)} of {len(distinct)} folders "
                f"unknown): name the folders by {names}class names or indices of the model's {num_classes} classes"
            )
    return np.asarray([mapping[f] for f in folders], np.int64)
