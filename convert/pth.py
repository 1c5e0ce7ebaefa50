"""Reading weights-only PyTorch ``.pth`` files without torch: a restricted unpickler.

A ``.pth`` file is a pickle whose tensors point at raw storages, either inside a zip archive
(torch >= 1.6: ``<prefix>/data.pkl`` and ``<prefix>/data/<key>``) or appended after the pickle
(the legacy format of torchvision's older checkpoints). This reader accepts exactly what a plain
state_dict needs and nothing else, the allow-list idea of ``torch.load(weights_only=True)``:

- ``torch._utils._rebuild_tensor_v2`` (a tensor: storage, offset, size, stride),
- storage types such as ``torch.FloatStorage`` inside persistent ids
  ``('storage', storage_type, key, location, numel[, view])``,
- ``collections.OrderedDict``, and the plain containers pickle builds itself.

Any other global is refused before it is looked up, so nothing in the file is ever executed.
Tensors come back as numpy arrays in their own dtype (float32, float16, float64, int64, ...),
with the state_dict's ``_metadata`` (the module versions ``torch.save`` records, which pickle
restores as an attribute of the ``OrderedDict``).
"""

from __future__ import annotations

import collections
import io
import pickle
import re
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxpull_convert.state_dict import Checkpoint, plain_metadata

# torch storage type name -> numpy dtype (bfloat16 is widened to float32 when read).
STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": np.uint16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class UnsafePickleError(ValueError):
    """The file's pickle asks for something other than plain weights (``global_name``: the first
    thing it asked for, e.g. ``torchvision.models.resnet.ResNet`` for a whole pickled model)."""

    def __init__(self, message: str, global_name: str = ""):
        super().__init__(message)
        self.global_name = global_name


class PthError(ValueError):
    """A ``.pth`` file this reader cannot read (corrupt, or a format it does not know)."""


class NotAStateDictError(PthError):
    """A readable ``.pth`` file whose object is not a state_dict (``what``: what it is instead)."""

    def __init__(self, what: str):
        super().__init__(f"the file holds {what}, not a state_dict (a mapping from names to tensors)")
        self.what = what


def describe(obj: Any) -> str:
    """What a loaded object that is not a state_dict is, in a few words (``a dict whose entries
    epoch, optimizer are not tensors``)."""
    if isinstance(obj, Mapping):
        is_tensor = lambda v: isinstance(v, np.ndarray) or type(v).__name__ in ("Tensor", "Parameter")
        odd = [printable(str(k), 40) for k, v in obj.items() if not is_tensor(v)][:3]
        return f"a dict whose entries {', '.join(odd)} are not tensors"
    return f"a {printable(type(obj).__name__, 40)}"


def printable(text: str, limit: int = 120) -> str:
    """``text`` on one line without terminal escape codes or other control characters, shortened."""
    text = re.sub(r"\x1b\[[0-9;?]*[ -/]*[@-~]", "", str(text))
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Storage:
    """A storage named by a persistent id; its bytes are attached once read."""

    def __init__(self, name: str, key: str, numel: int):
        self.name, self.key, self.numel = name, key, int(numel)
        self.data: np.ndarray | None = None


class _TensorRef:
    """What ``_rebuild_tensor_v2`` returns here: a strided view to materialise later."""

    def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]):
        self.storage, self.offset, self.size, self.stride = storage, int(offset), tuple(size), tuple(stride)


class _StorageType:
    def __init__(self, name: str):
        self.name = name


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, *metadata):
    if not isinstance(storage, _Storage):
        raise PthError("a tensor's storage is not a storage record")
    return _TensorRef(storage, storage_offset, size, stride)


def _allowed(module: str, name: str):
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
        return _rebuild_tensor_v2
    if (module, name) == ("collections", "OrderedDict"):
        return collections.OrderedDict
    if module == "torch" and name in STORAGE_DTYPES:
        return _StorageType(name)
    return None


class _Unpickler(pickle.Unpickler):
    """Allows only tensor rebuilds, storage types and OrderedDict; records every storage."""

    def __init__(self, stream: io.BytesIO, storages: dict[str, _Storage]):
        super().__init__(stream)
        self.storages = storages

    def find_class(self, module: str, name: str):
        found = _allowed(module, name)
        if found is None:
            raise UnsafePickleError(
                f"the file's pickle asks for {module}.{name}; jaxpull refuses pickles that are not plain weights "
                "(a state_dict of tensors)",
                f"{module}.{name}",
            )
        return found

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise UnsafePickleError(
                f"the file's pickle holds an unknown persistent record {str(pid)[:60]!r}; "
                "jaxpull refuses pickles that are not plain weights"
            )
        _, storage_type, key, _location, numel = pid[:5]
        view = pid[5] if len(pid) == 6 else None
        if not isinstance(storage_type, _StorageType):
            raise UnsafePickleError(
                "a storage record names no storage type; jaxpull refuses pickles that are not plain weights"
            )
        key = str(key)
        if key not in self.storages:
            self.storages[key] = _Storage(storage_type.name, key, numel)
        root = self.storages[key]
        if view is not None:  # very old files: (view key, offset, size) into the root storage
            _view_key, offset, size = view
            return _View(root, int(offset), int(size))
        return root


class _View(_Storage):
    """A storage that is a slice of another (legacy files only)."""

    def __init__(self, root: _Storage, offset: int, numel: int):
        super().__init__(root.name, root.key, numel)
        self.root, self.start = root, offset


def _unpickle(stream: io.BytesIO, storages: dict[str, _Storage]) -> Any:
    """One pickle from ``stream`` (which is left just past its STOP)."""
    try:
        return _Unpickler(stream, storages).load()
    except (UnsafePickleError, PthError):
        raise
    except Exception as e:  # truncated or malformed pickles raise many types
        raise PthError(f"malformed pickle ({type(e).__name__}: {e})") from None


def _typed(raw: bytes, name: str, numel: int, key: str) -> np.ndarray:
    dtype = np.dtype(STORAGE_DTYPES[name]).newbyteorder("<")
    if numel < 0:
        raise PthError(f"storage {key} has a negative size: the file is corrupt")
    if len(raw) < numel * dtype.itemsize:
        raise PthError(
            f"storage {key} holds {len(raw)} bytes, {numel * dtype.itemsize} expected: the file is truncated"
        )
    return np.frombuffer(raw, dtype, count=numel)


def _materialise(obj: Any) -> Any:
    """Replace every tensor record by a numpy array (a copy, in C order)."""
    if isinstance(obj, _TensorRef):
        st = obj.storage
        base = st.root.data[st.start : st.start + st.numel] if isinstance(st, _View) else st.data
        if base is None:
            raise PthError(f"storage {st.key} has no data in the file: it is truncated")
        n = len(base)
        if any(d < 0 for d in obj.size) or any(s < 0 for s in obj.stride) or len(obj.size) != len(obj.stride):
            raise PthError("a tensor has a negative size or stride")
        last = (
            obj.offset + sum((d - 1) * s for d, s in zip(obj.size, obj.stride, strict=True))
            if all(obj.size)
            else obj.offset - 1
        )
        if obj.offset < 0 or last >= n:
            raise PthError(f"a tensor reaches past the end of storage {st.key}: the file is corrupt")
        if int(np.prod(obj.size, dtype=np.float64)) > n:  # also bounds memory: no blow-up from a tiny storage
            raise PthError(
                "a tensor has more elements than its storage (overlapping or broadcast strides): "
                "save a contiguous copy of the state_dict"
            )
        view = np.lib.stride_tricks.as_strided(
            base[obj.offset :], obj.size, tuple(s * base.itemsize for s in obj.stride), writeable=False
        )
        arr = np.array(view, dtype=view.dtype.newbyteorder("="))
        if st.name == "BFloat16Storage":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        return arr
    if isinstance(obj, Mapping):
        return {k: _materialise(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_materialise(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialise(v) for v in obj)
    if isinstance(obj, _Storage):
        raise PthError("the file holds a bare storage, not a state_dict of tensors")
    return obj


def _read_zip(path: Path) -> Any:
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise PthError("the zip archive has no single <name>/data.pkl: it is not a torch.save file")
        prefix = pkl[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in names and z.read(f"{prefix}byteorder").strip() != b"little":
            raise PthError("the file stores big-endian tensors, which this reader does not support")
        storages: dict[str, _Storage] = {}
        obj = _unpickle(io.BytesIO(z.read(pkl[0])), storages)
        for key, st in storages.items():
            member = f"{prefix}data/{key}"
            if member not in names:
                raise PthError(f"storage {key} is missing from the archive: the file is corrupt")
            st.data = _typed(z.read(member), st.name, st.numel, key)
    return obj


def _read_legacy(data: bytes) -> Any:
    """The legacy format: magic, version, system info, the object, the storage keys, then storages."""
    f = io.BytesIO(data)
    storages: dict[str, _Storage] = {}
    if data[:2] != b"\x80\x02" or _unpickle(f, storages) != LEGACY_MAGIC:
        raise PthError("not a PyTorch file (neither a zip archive nor the legacy format)")
    _unpickle(f, storages)  # protocol version
    info = _unpickle(f, storages)
    if isinstance(info, dict) and not info.get("little_endian", True):
        raise PthError("the file stores big-endian tensors, which this reader does not support")
    obj = _unpickle(f, storages)
    keys = _unpickle(f, storages)
    if not isinstance(keys, list):
        raise PthError("the legacy file's storage list is malformed")
    for key in keys:
        st = storages.get(str(key))
        if st is None:
            raise PthError(f"storage {key} is listed but never used: the file is corrupt")
        head = f.read(8)
        if len(head) < 8:
            raise PthError(f"storage {key} is missing: the file is truncated")
        (numel,) = struct.unpack("<q", head)
        nbytes = numel * np.dtype(STORAGE_DTYPES[st.name]).itemsize
        st.data = _typed(f.read(nbytes), st.name, numel, st.key)
    return obj


def unwrap_checkpoint(obj):
    """The state_dict inside a checkpoint dict (under ``state_dict`` or ``model``), else ``obj``."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                return obj[key]
    return obj


def read_pth(path) -> Checkpoint:
    """Read a weights-only ``.pth`` file into ``{key: numpy array}`` and its ``_metadata``, without torch.

    Accepts a plain state_dict, or a checkpoint dict holding one under ``state_dict`` or ``model``
    (only that part is read).

    Raises:
      FileNotFoundError: no such file.
      UnsafePickleError: the pickle asks for anything but tensors and plain containers.
      PthError: the file is corrupt, truncated, or not a state_dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"state_dict file {str(path)!r} not found")
    if zipfile.is_zipfile(path):
        try:
            obj = _read_zip(path)
        except zipfile.BadZipFile as e:
            raise PthError(f"corrupt zip archive ({e})") from None
    else:
        obj = _read_legacy(path.read_bytes())
    obj = unwrap_checkpoint(obj)
    metadata = plain_metadata(getattr(obj, "_metadata", None))
    obj = _materialise(obj)
    if not isinstance(obj, Mapping) or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise NotAStateDictError(describe(obj))
    return Checkpoint(dict(obj), metadata)
