"""Largest parity errors per architecture against PyTorch (prints a markdown table; not a test).

    python benchmarks/parity_report.py [--size 64] [ARCH ...]

Random-weight torchvision models with random BatchNorm statistics (as in tests/), 2 images in
[-1, 1]: logits vs torchvision, vanilla gradients vs torch autograd, and sigmoid-gated pullbacks
(t = 0.3) vs the PyTorch implementation of the rule in convert/torch_reference.py.
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    import torch

    import jaxpull
    import jaxpull.core.models
    from jaxpull_convert import from_torch_module, torch_reference as R
    from jaxpull_convert.testing import map_errors, random_images, random_torchvision_model

    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("archs", nargs="*")
    args = parser.parse_args()
    archs = args.archs or [a for a in jaxpull.core.models.ARCHITECTURES if a != "efficientnet_lite0"]
    targets = np.array([[1, 7], [3, 500]])
    print(
        "| arch | logits max abs err / max abs logit | pullback t=0.3: min cosine, max rel err | vanilla: min cosine, max rel err |"
    )
    print("|---|---|---|---|")
    for arch in archs:
        tm = random_torchvision_model(arch)
        model = from_torch_module(arch, tm)
        x = random_images(2, args.size)
        xt, tt = torch.from_numpy(x), torch.from_numpy(targets)
        with torch.no_grad():
            ref = tm(R.normalize(xt)).numpy()
        logit = np.abs(np.asarray(model(x)) - ref).max() / max(1.0, np.abs(ref).max())
        soft = map_errors(jaxpull.pullback(model, x, targets), R.pullback(R.gated(tm), xt, tt))
        hard = map_errors(jaxpull.pullback(model, x, targets, rules="vanilla"), R.pullback(tm, xt, tt))
        print(f"| {arch} | {logit:.1e} | {soft[0]:.7f}, {soft[1]:.1e} | {hard[0]:.7f}, {hard[1]:.1e} |", flush=True)


if __name__ == "__main__":
    main()
