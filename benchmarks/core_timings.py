"""Compile and run times of the core functions on this machine (prints figures; not a test).

    python benchmarks/core_timings.py            # resnet50, random weights, 224x224

Reports: one 5-step ascent of one image (1 target), and single-step pullbacks of one image for
K targets with both strategies ("shared": one forward + vmapped VJP; "separate": vmapped
gradients), so ``explain._SEPARATE_UP_TO`` can be set from measurement.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from bench_vs_torch import timed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--ks", default="1,2,4,10")
    args = parser.parse_args()

    import torch
    import torchvision

    import jaxpull
    import jaxpull_convert

    torch.manual_seed(0)
    model = jaxpull_convert.from_torch_module(args.arch, torchvision.models.get_model(args.arch).eval())
    x = np.random.default_rng(0).uniform(-1, 1, (1, args.size, args.size, 3)).astype(np.float32)
    print(f"{args.arch} {args.size}x{args.size}, jax {jax.__version__}, {jax.devices()[0].platform}")
    first, run, _ = timed(lambda: jaxpull.ascent(model, x, [1], steps=5), repeats=3)
    print(f"ascent 5 steps, 1 image x 1 target: first call (compile + run) {first:.2f}s, run {run:.2f}s")
    for k in [int(v) for v in args.ks.split(",")]:
        targets = np.arange(k)
        for strategy in ("shared", "separate"):
            first, run, _ = timed(lambda: jaxpull.pullback(model, x, targets, strategy=strategy), repeats=3)
            print(f"pullback K={k:4d} {strategy:8s}: first call {first:.2f}s, run {run:.3f}s")


if __name__ == "__main__":
    main()
