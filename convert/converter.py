"""Conversion: torch state_dict -> jaxpull parameter tree -> checked ``.safetensors`` file."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Mapping, Optional, Tuple

import jax
import numpy as np
import torch

import jaxpull
from jaxpull import io, models
from jaxpull.model import Model, ModelSpec
from jaxpull_convert import sources
from jaxpull_convert.state_dict import StateDict

# Conversion refuses a model whose logits differ from torch's by more than this, relative to
# the largest |logit| (floored at 1): max |jax - torch| <= LOGIT_TOLERANCE * max(1, max |torch|).
LOGIT_TOLERANCE = 1e-4


class ConversionError(ValueError):
    """A state_dict or weights name that cannot be converted; the message lists every problem."""


def _num_classes(tensors: Mapping[str, np.ndarray]) -> int:
    """Rows of the last 2-D weight: the classifier of every supported architecture."""
    matrices = [v for k, v in tensors.items() if k.endswith("weight") and np.ndim(v) == 2]
    if not matrices:
        raise ConversionError("the state_dict has no linear layer: is it a classifier's state_dict?")
    return int(np.shape(matrices[-1])[0])


def from_state_dict(
    arch: str,
    tensors: Mapping[str, np.ndarray],
    *,
    class_names: Tuple[str, ...] = (),
    metadata: Optional[Mapping[str, str]] = None,
) -> Model:
    """Map a torch state_dict (numpy arrays) onto ``arch``'s Flax parameters.

    Raises:
      ConversionError: listing every missing, unexpected and wrongly shaped key at once.
    """
    family = models.get(arch)
    num_classes = _num_classes(tensors)
    spec = ModelSpec(
        arch=arch,
        num_classes=num_classes,
        input_mean=sources.input_mean(arch),
        input_std=sources.input_std(arch),
        class_names=tuple(class_names) if len(class_names) == num_classes else sources.default_class_names(num_classes),
        metadata=dict(metadata or {}),
    )
    sd = StateDict(tensors)
    params = family.torch_layout(arch, sd)
    problems = [f"missing {k}" for k in sd.missing] + [f"unexpected {k}" for k in sd.unused()]
    # Then what the Flax module expects and did not get (blocks absent from the state_dict).
    problems += [f"{p} (Flax parameter)" for p in io.param_problems(params, spec)]
    if problems:
        raise ConversionError(f"state_dict does not match {arch}: {io.summarize(problems)}")
    return Model(jax.tree_util.tree_map(jax.numpy.asarray, params), spec)


def from_torch_module(arch: str, module: torch.nn.Module, class_names: Tuple[str, ...] = ()) -> Model:
    """Convert an in-memory torch model (e.g. ``torchvision.models.resnet50()``)."""
    tensors = {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
    return from_state_dict(arch, tensors, class_names=class_names, metadata={"bn_folded": "true"})


def logit_parity(torch_model: torch.nn.Module, model: Model, image_size: int = 224, batch: int = 2, seed: int = 0) -> dict:
    """Run both models on the same random images in [-1, 1]; return the logit errors.

    Returns:
      ``{"max_abs": ..., "max_rel": ..., "scale": max |torch logit|}``; ``max_rel`` is max_abs
      divided by max(1, scale), the quantity compared with ``LOGIT_TOLERANCE``.
    """
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (batch, image_size, image_size, 3)).astype(np.float32)
    mean = torch.tensor(model.spec.input_mean).view(1, 3, 1, 1)
    std = torch.tensor(model.spec.input_std).view(1, 3, 1, 1)
    with torch.no_grad():
        xt = torch.from_numpy(x).permute(0, 3, 1, 2)
        expected = torch_model.eval()(((xt + 1) / 2 - mean) / std).numpy()
    got = np.asarray(model(x))
    max_abs = float(np.max(np.abs(got - expected)))
    scale = float(np.max(np.abs(expected)))
    return {"max_abs": max_abs, "max_rel": max_abs / max(1.0, scale), "scale": scale}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def convert(
    arch: str,
    out: os.PathLike,
    *,
    weights: Optional[str] = None,
    state_dict: Optional[os.PathLike] = None,
    image_size: int = 224,
    tolerance: float = LOGIT_TOLERANCE,
) -> dict:
    """Convert ``arch`` from a torchvision weights name or a state_dict file; write ``out``.

    The converted model's logits are compared with the torch model's on two random images of
    ``image_size``; a file is written (atomically) only if the error is within ``tolerance``.

    Returns:
      the metadata written, including the measured ``parity_max_abs`` / ``parity_max_rel``.
    """
    models.get(arch)
    if (weights is None) == (state_dict is None):
        raise ConversionError("give exactly one of --weights NAME or --state-dict FILE")
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConversionError(f"output {str(out)!r} must end in .safetensors")
    if not out.parent.is_dir() and str(out.parent):
        raise ConversionError(f"output directory {str(out.parent)!r} does not exist: create it first")
    torch_model = None
    if weights is not None:
        torch_model, tensors, class_names, source = sources.from_weights_name(arch, weights)
    else:
        path = Path(state_dict)
        tensors = sources.read_state_dict(path)
        class_names = ()
        source = f"state_dict {path.name} sha256:{_sha256(path)}"
    metadata = {
        "source": source,
        "bn_folded": "true",
        "bn_note": "eval-mode BatchNorm folded into the preceding convolution, or stored as x*scale+bias",
        "converted_with": f"jaxpull {jaxpull.__version__}, torch {torch.__version__}",
    }
    model = from_state_dict(arch, tensors, class_names=class_names, metadata=metadata)
    if torch_model is None:
        torch_model = sources.torch_model(arch, tensors, model.num_classes, image_size)
    err = logit_parity(torch_model, model, image_size=image_size)
    if not err["max_rel"] <= tolerance:
        raise ConversionError(
            f"converted {arch} disagrees with torch: max |logit error| {err['max_abs']:.3g} "
            f"(relative {err['max_rel']:.3g} > tolerance {tolerance:g}); no file written"
        )
    metadata.update(
        parity_max_abs=f"{err['max_abs']:.3e}",
        parity_max_rel=f"{err['max_rel']:.3e}",
        parity_check=f"2 random images {image_size}x{image_size} in [-1, 1], tolerance {tolerance:g} relative",
    )
    io.save(Model(model.params, model.spec), out, metadata)
    return metadata
