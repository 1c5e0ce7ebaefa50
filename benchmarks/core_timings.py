"""Compile and run times of the core functions on this machine (prints figures; not a test).

    python benchmarks/core_timings.py            # resnet50, random weights, 224x224

Reports: one 5-step ascent of one image (1 target), and pullbacks of one image for K targets
two ways: ``jaxpull.pullback`` (one shared forward, its VJP vmapped over the K targets) and, for
comparison, K separate gradients vmapped (forward included), defined here only: the library
keeps the shared forward, measured never slower (README, "Speed").
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from bench_vs_torch import timed  # noqa: E402


@jax.jit
def separate_gradients(model, x, targets, rules):
    """K gradients, each with its own forward: ``(N, H, W, 3)``, ``(N, K)`` -> ``(N, K, H, W, 3)``."""

    def one_target(t):  # t: (N,)
        def selected(x):
            logits = model.apply(x, rules)
            return jnp.sum(jnp.take_along_axis(logits, t[:, None], axis=1))

        return jax.grad(selected)(x)

    return jnp.swapaxes(jax.vmap(one_target)(targets.T), 0, 1)


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
    rules = jaxpull.resolve()
    for k in [int(v) for v in args.ks.split(",")]:
        targets = np.arange(k)
        ways = {
            "shared": lambda targets=targets: jaxpull.pullback(model, x, targets),
            "separate": lambda targets=targets: separate_gradients(
                model, jnp.asarray(x), jnp.asarray(targets[None]), rules
            ),
        }
        for name, fn in ways.items():
            first, run, _ = timed(fn, repeats=3)
            print(f"pullback K={k:4d} {name:8s}: first call {first:.2f}s, run {run:.3f}s")


if __name__ == "__main__":
    main()
