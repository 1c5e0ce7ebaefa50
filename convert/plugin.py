"""What the converter adds to jaxpull, registered as entry points (pyproject.toml; see :mod:`jaxpull.plugins`).

- ``OFFLINE_MODELS`` (group ``jaxpull.offline_models``): the architectures of the offline table
  convert on first use from their installed PyPI package, so ``jaxpull.load("mobilenet_v2")`` and
  the demo work offline, without torch;
- ``add_convert_command`` (group ``jaxpull.commands``, name ``convert``): ``jaxpull convert``.

jaxpull imports none of this: it finds these objects through the installed package metadata.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

from jaxpull_convert import offline
from jaxpull_convert.converter import convert


class OfflineModels:
    """The offline table's architectures (their ``DEFAULT`` row), converted on first use."""

    def names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(src.arch for src in offline.OFFLINE if "DEFAULT" in src.names))

    def convert(self, name: str, out: os.PathLike, log: Callable[[str], None]) -> None:
        """Convert ``name``'s offline weights to ``out`` (checked; atomic: nothing written on refusal).

        Raises:
          ValueError: the package that ships the weights is not installed (the message says how
            to install it), or its file's sha256 is wrong.
        """
        src = offline.find(name, "DEFAULT")
        if src is None:
            raise ValueError(f"{name} has no offline weights: choose one of {', '.join(self.names())}")
        if offline.locate(src) is None:
            raise ValueError(
                f"{name} converts on first use from the package {src.package}, which is not installed: {src.install}"
            )
        log(f"converting {name} from the installed package {src.package} to {out} (first use only)")
        convert(name, out, weights="DEFAULT")


OFFLINE_MODELS = OfflineModels()


def add_convert_command(sub) -> None:
    """Add ``jaxpull convert`` to the subparsers ``sub`` of the ``jaxpull`` command line."""
    p = sub.add_parser("convert", help="convert torchvision or timm weights to a jaxpull .safetensors file")
    p.add_argument(
        "arch", help="torchvision architecture name, e.g. resnet50, or timm/<model name>, e.g. timm/pvt_v2_b1"
    )
    src = p.add_mutually_exclusive_group()  # one is required, except for timm/<name>: timm's default weights
    src.add_argument(
        "--weights",
        help="torchvision weights name, e.g. IMAGENET1K_V1 or DEFAULT (downloads); for timm/<name> a pretrained tag, "
        "e.g. in1k (default: timm's default weights, downloaded through timm)",
    )
    src.add_argument(
        "--state-dict",
        help="a local state_dict file: torch.save(model.state_dict(), f) (.pth, read without running its code) "
        "or a .safetensors file of the same tensors",
    )
    p.add_argument("-o", "--output", required=True, help="output .safetensors path")
    p.add_argument("--image-size", type=int, default=224, help="input size of the parity check (default 224)")
    p.add_argument(
        "--transform-input",
        choices=["true", "false"],
        default=None,
        help="googlenet / inception_v3 only: torchvision's transform_input (default true, as its pretrained weights)",
    )
    p.set_defaults(run=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    transform_input = None if args.transform_input is None else args.transform_input == "true"
    meta = convert(
        args.arch,
        args.output,
        weights=args.weights,
        state_dict=args.state_dict,
        image_size=args.image_size,
        transform_input=transform_input,
    )
    print(
        f"wrote {args.output}: {args.arch} from {meta['source']}; "
        f"max |logit error| vs torch {meta['parity_max_abs']} (relative {meta['parity_max_rel']})"
    )
    if "state_dict_note" in meta:
        print(f"note: {meta['state_dict_note']}")
    return 0
