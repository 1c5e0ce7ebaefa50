"""Conversion: torch state_dict -> jaxpull parameter tree -> checked ``.safetensors`` file."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where a function needs it: converting known weights does not
    import torch

import numpy as np

import jaxpull
from jaxpull.core import models
from jaxpull.core.model import Model, ModelSpec
from jaxpull.core.preprocessing import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, Preprocessing
from jaxpull.files import model_file, outputs
from jaxpull_convert import fingerprint, offline, sources
from jaxpull_convert.state_dict import Checkpoint, StateDict, plain_metadata, unwrap, unwrap_note

# Conversion refuses a model whose logits differ from torch's by more than this, relative to
# the largest |logit| (floored at 1): max |jax - torch| <= LOGIT_TOLERANCE * max(1, max |torch|).
LOGIT_TOLERANCE = 1e-4
# The parity check's input size is bounded as every image size of a model file is:
# MIN_IMAGE_SIZE, MAX_IMAGE_SIZE of jaxpull.core.preprocessing.


class ConversionError(ValueError):
    """A state_dict or weights name that cannot be converted; the message lists every problem."""


def _num_classes(family: models.Family, tensors: Mapping[str, np.ndarray]) -> int:
    """Rows of the family's classifier weight (``Family.classifier``: found by name, so the keys'
    order does not matter); 1000 where it is missing (the shape check then names the missing key)."""
    weight = tensors.get(f"{family.classifier}.weight")
    return int(np.shape(weight)[0]) if weight is not None and np.ndim(weight) >= 1 else 1000


def from_state_dict(
    arch: str,
    tensors: Mapping[str, np.ndarray],
    *,
    class_names: tuple[str, ...] = (),
    metadata: Mapping[str, str] | None = None,
    transform_input: bool | None = None,
    preprocessing: Preprocessing | None = None,
    config: Mapping[str, Any] | None = None,
    torch_metadata: Mapping[str, Mapping[str, Any]] | None = None,
) -> Model:
    """Map a torch state_dict (numpy arrays) onto ``arch``'s Flax parameters.

    ``transform_input`` (GoogLeNet, Inception-v3 only) and ``preprocessing`` default to what the
    family's pretrained weights use. The family's training-only auxiliary heads are dropped.
    ``config``: the family builder's size options for a model of other sizes than ``arch``'s
    (see ``ModelSpec.config``); passed to the family's ``torch_layout`` too. ``torch_metadata``:
    the state_dict's ``_metadata`` (module versions: MNASNet's; default: the ``_metadata`` attribute
    of ``tensors``, which a torch state_dict has). A prefix that a training wrapper
    put on every key (``module.``, ``_orig_mod.``) is removed, and the file's metadata says so
    (``state_dict_note``).

    Raises:
      ConversionError: listing every missing, unexpected and wrongly shaped key at once.
    """
    family = models.get(arch)
    if transform_input is not None and family.transform_input is None:
        raise ConversionError(f"{arch} has no transform_input option: leave it unset")
    meta = dict(metadata or {})
    if torch_metadata is None:  # a torch state_dict passed as it is keeps its _metadata
        torch_metadata = getattr(tensors, "_metadata", None)
    checkpoint, removed = unwrap(Checkpoint(dict(tensors), plain_metadata(torch_metadata)))
    if removed:
        meta["state_dict_note"] = unwrap_note(removed)
    sd = StateDict(checkpoint.tensors, checkpoint.metadata)
    if family.auxiliary_keys and sd.ignore(family.auxiliary_keys):
        meta["ignored_keys"] = (
            f"{len(sd.ignored)} tensors of the training-only auxiliary classifiers ({family.auxiliary_keys})"
        )
    num_classes = _num_classes(family, sd.tensors)
    if config is None and family.state_dict_config is not None:
        try:
            config = family.state_dict_config(arch, sd.tensors, sd.metadata)
        except ValueError as e:
            raise ConversionError(f"state_dict does not match {arch}: {e}") from None
    spec = ModelSpec(
        arch=arch,
        num_classes=num_classes,
        input_mean=sources.input_mean(arch),
        input_std=sources.input_std(arch),
        class_names=tuple(class_names) if len(class_names) == num_classes else sources.default_class_names(num_classes),
        metadata=meta,
        transform_input=bool(family.transform_input if transform_input is None else transform_input),
        preprocessing=(preprocessing or family.preprocessing).check(),
        config=tuple(sorted(dict(config or {}).items())),
    )
    params = family.torch_layout(arch, sd, **dict(config or {}))
    problems = [f"missing {k}" for k in sd.missing] + [f"unexpected {k}" for k in sd.unused()]
    # Then what the Flax module expects and did not get (blocks absent from the state_dict).
    problems += [f"{p} (Flax parameter)" for p in model_file.param_problems(params, spec)]
    if problems:
        raise ConversionError(f"state_dict does not match {arch}: {model_file.summarize(problems)}")
    return Model.from_numpy(params, spec)


def from_torch_module(arch: str, module: torch.nn.Module, class_names: tuple[str, ...] = ()) -> Model:
    """Convert an in-memory torch model (e.g. ``torchvision.models.resnet50()``), with its
    ``transform_input`` where it has one (GoogLeNet, Inception-v3), and the sizes it was built
    with where the family reads them (``torch_config``: e.g. a small ``VisionTransformer``). A timm
    model (``arch`` ``timm/<name>``) converts through :func:`jaxpull_convert.timm_source.from_module`."""
    if arch.startswith("timm/"):  # timm's models: their source module does the rest
        from jaxpull_convert import timm_source

        return timm_source.from_module(arch, module, class_names)
    state_dict = module.state_dict()
    tensors = {k: v.detach().cpu().numpy() for k, v in state_dict.items()}
    family = models.get(arch)
    config = family.torch_config(module) if family.torch_config is not None else None
    return from_state_dict(
        arch,
        tensors,
        class_names=class_names,
        metadata={"bn_folded": "true"},
        transform_input=getattr(module, "transform_input", None),
        config=config,
        torch_metadata=getattr(state_dict, "_metadata", None),
    )


def logit_parity(
    torch_model: torch.nn.Module, model: Model, image_size: int = 224, batch: int = 2, seed: int = 0
) -> dict:
    """Run both models on the same random images in [-1, 1]; return the logit errors.

    Returns:
      ``{"max_abs": ..., "max_rel": ..., "scale": max |torch logit|}``; ``max_rel`` is max_abs
      divided by max(1, scale), the quantity compared with ``LOGIT_TOLERANCE``.
    """
    import torch

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


def _fingerprint_check(arch: str, model: Model, sha256: str | None, tolerance: float) -> dict:
    """Without torch: compare ``model`` with the committed torch logits of its checkpoint."""
    record = fingerprint.lookup(sha256) if sha256 else None
    if record is None or record["arch"] != arch:
        raise ConversionError(
            f"without torch only known checkpoints convert, and this is not one for {arch}: pip install 'jaxpull[convert]'"
        )
    err = fingerprint.error(np.asarray(model(fingerprint.synthetic_images())), record)
    if not err["max_rel"] <= tolerance:
        raise ConversionError(
            f"converted {arch} disagrees with the recorded torch logits of its checkpoint: max |logit error| "
            f"{err['max_abs']:.3g} (relative {err['max_rel']:.3g} > tolerance {tolerance:g}); no file written"
        )
    return dict(
        parity_max_abs=f"{err['max_abs']:.3e}",
        parity_max_rel=f"{err['max_rel']:.3e}",
        parity_check=f"without torch: the recorded torch logits (fingerprints.json) of {record['input']}, "
        f"tolerance {tolerance:g} relative",
    )


def convert(
    arch: str,
    out: os.PathLike,
    *,
    weights: str | None = None,
    state_dict: os.PathLike | None = None,
    image_size: int = 224,
    tolerance: float = LOGIT_TOLERANCE,
    transform_input: bool | None = None,
) -> dict:
    """Convert ``arch`` from a torchvision weights name or a state_dict file; write ``out``.

    The converted model's logits are compared with the torch model's on two random images of
    ``image_size``; a file is written (atomically) only if the error is within ``tolerance``.
    The file records the image sizes the weights expect (``weights.transforms()`` for torchvision
    weights, the family's defaults otherwise) and, for GoogLeNet and Inception-v3,
    ``transform_input`` (default: True, as torchvision's pretrained weights).

    A timm architecture (``timm/<name>``) converts through :func:`jaxpull_convert.timm_source.convert`
    (``weights``: timm's pretrained tag; neither ``weights`` nor ``state_dict``: timm's default weights).

    Returns:
      the metadata written, including the measured ``parity_max_abs`` / ``parity_max_rel``.
    """
    if arch.startswith("timm/"):  # timm's models: their source module does the rest
        from jaxpull_convert import timm_source

        return timm_source.convert(
            arch,
            out,
            weights=weights,
            state_dict=state_dict,
            image_size=image_size,
            tolerance=tolerance,
            transform_input=transform_input,
        )
    models.get(arch)
    if (weights is None) == (state_dict is None):
        raise ConversionError("give exactly one of --weights NAME or --state-dict FILE")
    out = outputs.check_output(out, ".safetensors")  # before any download or compute
    if (
        isinstance(image_size, bool)
        or not isinstance(image_size, int)
        or not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE
    ):
        raise ConversionError(
            f"image size {image_size!r} is out of range: use a whole number of pixels in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}]"
        )
    torch_model, sha256 = None, None  # sha256: of the file read, for the check without torch
    if weights is not None:
        torch_model, checkpoint, class_names, source = sources.from_weights_name(arch, weights)
        if torch_model is None:  # the offline table's file, its sha256 already checked
            sha256 = offline.find(arch, weights).sha256
    else:
        path = Path(state_dict)
        if not path.is_file():
            raise FileNotFoundError(f"state_dict file {str(path)!r} not found")
        sha256 = offline.sha256(path)
        if sources.torch_or_none() is None and fingerprint.lookup(sha256) is None:
            raise ConversionError(
                f"{path.name} (sha256 {sha256[:16]}...) is not a checkpoint jaxpull knows, and without torch its "
                "conversion cannot be checked: pip install 'jaxpull[convert]'"
            )
        checkpoint = sources.read_state_dict(path)
        class_names = ()
        source = f"state_dict {path.name} sha256:{sha256}"
    checkpoint, removed = unwrap(checkpoint)
    torch = sources.torch_or_none()
    metadata = {
        "source": source,
        "bn_folded": "true",
        "bn_note": "eval-mode BatchNorm folded into the preceding convolution, or stored as x*scale+bias",
        "converted_with": f"jaxpull {jaxpull.__version__}, "
        + (f"torch {torch.__version__}" if torch is not None else "without torch (jaxpull's .pth reader)"),
    }
    if removed:
        metadata["state_dict_note"] = unwrap_note(removed)
    preprocessing = None
    if torch_model is not None:  # torchvision's weights: their own transforms() sizes
        preprocessing = sources.weights_preprocessing(sources.torchvision_weights(arch, weights))
    model = from_state_dict(
        arch,
        checkpoint.tensors,
        class_names=class_names,
        metadata=metadata,
        transform_input=transform_input,
        preprocessing=preprocessing,
        torch_metadata=checkpoint.metadata,
    )
    if torch_model is not None and hasattr(torch_model, "transform_input"):
        torch_model.transform_input = model.spec.transform_input
    if torch is None:
        metadata.update(_fingerprint_check(arch, model, sha256, tolerance))
        model_file.save(Model(model.params, model.spec), out, metadata)
        return metadata
    config = dict(model.spec.config)
    if "image_size" in config:  # a fixed input size (ViT's position embeddings): check at that size
        image_size = config["image_size"]
    if torch_model is None:
        torch_model = sources.torch_model(
            arch,
            checkpoint.tensors,
            model.num_classes,
            image_size,
            model.spec.transform_input,
            config,
            checkpoint.metadata,
        )
    return checked_save(torch_model, model, out, metadata, image_size, tolerance)


def checked_save(
    torch_model, model: Model, out, metadata: dict, image_size: int, tolerance: float, reference: str = "torch"
) -> dict:
    """Write ``model`` to ``out`` with ``metadata`` only if its logits agree with ``torch_model``'s
    (``reference``: what that model is, for the messages) on two random ``image_size`` images within
    ``tolerance``; the measured errors join the metadata, which is returned.

    Raises:
      ConversionError (one line, nothing written): the model cannot run on that size, or disagrees.
    """
    arch = model.arch
    try:
        err = logit_parity(torch_model, model, image_size=image_size)
    except (RuntimeError, ValueError, TypeError, AssertionError) as e:  # torchvision asserts some input sizes
        if isinstance(e, ConversionError):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(
            f"{arch} cannot run on {image_size}x{image_size} images ({first}): use a larger --image-size such as 224"
        ) from None
    if not err["max_rel"] <= tolerance:
        raise ConversionError(
            f"converted {arch} disagrees with {reference}: max |logit error| {err['max_abs']:.3g} "
            f"(relative {err['max_rel']:.3g} > tolerance {tolerance:g}); no file written"
        )
    metadata.update(
        parity_max_abs=f"{err['max_abs']:.3e}",
        parity_max_rel=f"{err['max_rel']:.3e}",
        parity_check=f"{reference}'s model, 2 random images {image_size}x{image_size} in [-1, 1], "
        f"tolerance {tolerance:g} relative",
    )
    model_file.save(Model(model.params, model.spec), out, metadata)
    return metadata
