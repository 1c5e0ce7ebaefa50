"""The ``jaxpull`` command line: a thin shell over the library.

Every failure a user can cause prints one line, ``jaxpull: error: ...``, and exits with 2;
nothing is left half-written (outputs are written to a temporary file and renamed).
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _convert(args: argparse.Namespace) -> int:
    try:
        import jaxpull_convert
    except ImportError as e:
        raise RuntimeError(
            f"conversion needs torch and torchvision ({e}): pip install 'jaxpull[convert]'"
        ) from None
    meta = jaxpull_convert.convert(
        args.arch, args.output, weights=args.weights, state_dict=args.state_dict, image_size=args.image_size
    )
    print(
        f"wrote {args.output}: {args.arch} from {meta['source']}; "
        f"max |logit error| vs torch {meta['parity_max_abs']} (relative {meta['parity_max_rel']})"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="jaxpull", description="Excitation pullbacks for ReLU networks in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert torchvision weights to a jaxpull .safetensors file")
    p.add_argument("arch", help="torchvision architecture name, e.g. resnet50")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", help="torchvision weights name, e.g. IMAGENET1K_V1 or DEFAULT (downloads)")
    src.add_argument("--state-dict", help="a local state_dict file (.pth), loaded with weights_only=True")
    p.add_argument("-o", "--output", required=True, help="output .safetensors path")
    p.add_argument("--image-size", type=int, default=224, help="input size of the parity check (default 224)")
    p.set_defaults(run=_convert)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``jaxpull`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("jaxpull: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as e:
        print(f"jaxpull: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
