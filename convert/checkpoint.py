"""Reading a ``--state-dict`` file: the state_dicts users have, and one line for everything else.

A state_dict file is what ``torch.save(model.state_dict(), f)`` writes (a zip archive, or the
legacy format of older checkpoints), a checkpoint dict holding one under ``state_dict`` or
``model``, or a ``.safetensors`` file of the same tensors. It is read without running any of its
code: with ``torch.load(weights_only=True)`` where torch is installed, else with jaxpull's
restricted reader (:mod:`jaxpull_convert.pth`); torch's ``_metadata`` (module versions) comes
along. Any other file (a whole pickled model, a TorchScript archive, a converted jaxpull model,
text, an empty file) is refused with one line saying what it is and what to save instead.
"""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from jaxpull_convert import pth
from jaxpull_convert.state_dict import Checkpoint, plain_metadata

SAVE_INSTEAD = "save the weights with torch.save(model.state_dict(), f) and convert that file"
# Where a pickled class comes from when the pickle is a whole model rather than its weights.
MODEL_MODULES = ("torch.nn.", "torchvision.models.", "timm.", "__torch__.", "__main__.")


def _is_safetensors(head: bytes, size: int) -> bool:
    """A safetensors file: 8 bytes of little-endian header length, then a JSON object."""
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= size - 8 and head[8:9] == b"{"


def _is_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 3  # a multi-byte character cut at the end of the sample
    return True


def _what_zip_is(path: Path) -> str | None:
    """What a zip file is when it is not a ``torch.save`` archive (None if it is one)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except zipfile.BadZipFile:
        return "a corrupt zip archive"
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        return "a TorchScript archive (torch.jit.save), not a state_dict"
    if not any(n.endswith("/data.pkl") and n.count("/") == 1 for n in names):
        return "a zip archive that torch.save did not write"
    return None


def _refuse(path: Path, what: str, advice: str = SAVE_INSTEAD) -> ValueError:
    return ValueError(f"cannot read state_dict {str(path)!r}: it is {what}: {advice}")


def _unreadable(path: Path, head: bytes, torch_error: str = "") -> ValueError:
    """The error for a file neither reader accepts: what it holds, found by jaxpull's restricted
    reader (which runs nothing) and by its first bytes. Never torch's advice to load it unsafely."""
    try:
        pth.read_pth(path)
    except pth.UnsafePickleError as e:
        name = pth.printable(e.global_name, 80)
        if name.startswith(MODEL_MODULES):
            return _refuse(path, f"a whole pickled model ({name}), not a state_dict")
        return _refuse(path, f"a pickle of Python objects ({name}), not a state_dict of tensors")
    except pth.NotAStateDictError as e:
        return _refuse(path, f"{e.what}, not a state_dict (a mapping from names to tensors)")
    except (pth.PthError, OSError) as e:
        if _is_text(head):
            return _refuse(path, "a text file, not a PyTorch file")
        return ValueError(f"cannot read state_dict {str(path)!r}: {pth.printable(e)}")
    reason = pth.printable(torch_error) if "weights_only" not in torch_error else "torch.load could not read it"
    return ValueError(f"cannot read state_dict {str(path)!r}: {reason}")


def _read_safetensors(path: Path, torch) -> Checkpoint:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy" if torch is None else "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format", "").startswith("jaxpull/"):
                raise _refuse(
                    path,
                    "a model file jaxpull already converted",
                    "load it with jaxpull.load(path) or --model, there is nothing to convert",
                )
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, TypeError) as e:  # TypeError: a dtype numpy lacks (bfloat16)
        raise ValueError(f"cannot read state_dict {str(path)!r}: {pth.printable(e)}") from None
    if torch is not None:
        return Checkpoint({k: v.detach().float().numpy() for k, v in tensors.items()})
    return Checkpoint({k: np.asarray(v, np.float32) for k, v in tensors.items()})


def read(path, torch=None) -> Checkpoint:
    """The state_dict in the file ``path`` as float32 arrays, with torch's ``_metadata``.

    ``torch``: the torch module to read with (``torch.load(weights_only=True)``), or None for
    jaxpull's own restricted reader.

    Raises:
      FileNotFoundError: no such file.
      ValueError: one line: the file is not a state_dict (saying what it is and what to save
        instead), or is corrupt.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"state_dict file {str(path)!r} not found")
    size = path.stat().st_size
    if size == 0:
        raise _refuse(path, "an empty file")
    with open(path, "rb") as f:
        head = f.read(4096)
    if _is_safetensors(head, size):
        return _read_safetensors(path, torch)
    if head.startswith(b"PK\x03\x04"):
        what = _what_zip_is(path)
        if what is not None:
            raise _refuse(path, what)
    if torch is None:
        try:
            checkpoint = pth.read_pth(path)
        except (pth.UnsafePickleError, pth.PthError):
            raise _unreadable(path, head) from None
        return Checkpoint({k: np.asarray(v, np.float32) for k, v in checkpoint.tensors.items()}, checkpoint.metadata)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or unsafe files
        raise _unreadable(path, head, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from None
    obj = pth.unwrap_checkpoint(obj)
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise _refuse(path, f"{pth.describe(obj)}, not a state_dict (a mapping from names to tensors)")
    metadata = plain_metadata(getattr(obj, "_metadata", None))
    return Checkpoint({k: v.detach().float().numpy() for k, v in obj.items()}, metadata)
