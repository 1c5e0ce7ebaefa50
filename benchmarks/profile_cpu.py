"""Per-layer CPU profile of a torchvision CNN's convolutions, as a pullback and an ascent use them.

    python benchmarks/profile_cpu.py [--arch resnet50] [--size 224] [--k 100] [--batch 50] [--repeats 3]

A pullback for K labels is one forward at batch 1 and its VJP vmapped over K cotangents, so its
convolutions run as input-gradient (transposed) convolutions at batch K; an ascent step runs the
forward and the input gradient at batch B. For every distinct (groups = 1) convolution of ``--arch``
this times both, interleaved in one process (best of ``--repeats``), for each formulation:

  lax:    ``lax.conv_general_dilated`` (NHWC / HWIO), what ``jaxpull.core.layers.Conv`` runs off CPU;
  im2col: one matmul on the concatenated shifted strided slices (1x1: a strided slice and a dot);
  taps:   the sum of kh*kw shifted-slice matmuls (kxk only);
  dense:  ``lowering.dense_conv`` (``lax.conv`` forward; input gradient as an HWIO convolution,
          strided ones by the phase decomposition);
  auto:   the formulation ``Conv`` picks on CPU (``lowering.cpu_conv``).

Prints a markdown table (ms per call, GFLOP/s from the nominal 2*M*kh*kw*Cin*Cout, % of the float32
matmul peak measured with a 2048^2 ``jnp.dot``) and the per-variant totals weighted by how often
each shape occurs; then the whole pullback and ascent step with ``lax.conv`` (autodiff's
transpose) everywhere against ``Conv``'s CPU choice. Not a test: figures vary with the machine and its load.
"""

from __future__ import annotations

import argparse
import collections
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxpull.core import layers, lowering

Pad = tuple[tuple[int, int], tuple[int, int]]
ConvFn = Callable[[jax.Array, jax.Array, int, Pad], jax.Array]


class Shape(NamedTuple):
    """One convolution: input ``(H, W, Cin)``, kernel ``(kh, kw, Cin, Cout)``, stride, padding."""

    h: int
    w: int
    cin: int
    cout: int
    kh: int
    kw: int
    stride: int
    pad: Pad

    def out_hw(self) -> tuple[int, int]:
        ho = (self.h + sum(self.pad[0]) - self.kh) // self.stride + 1
        wo = (self.w + sum(self.pad[1]) - self.kw) // self.stride + 1
        return ho, wo

    def flops(self, n: int) -> float:
        ho, wo = self.out_hw()
        return 2.0 * n * ho * wo * self.kh * self.kw * self.cin * self.cout

    def label(self) -> str:
        return f"{self.h}x{self.w} {self.cin}->{self.cout} {self.kh}x{self.kw}/{self.stride}"


def conv_lax(x: jax.Array, kernel: jax.Array, stride: int, pad: Pad) -> jax.Array:
    """``lax.conv_general_dilated``: ``(N, H, W, Cin)``, ``(kh, kw, Cin, Cout)`` -> ``(N, Ho, Wo, Cout)``."""
    return lax.conv_general_dilated(
        x, kernel, (stride, stride), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=jnp.float32
    )


def conv_taps(x: jax.Array, kernel: jax.Array, stride: int, pad: Pad) -> jax.Array:
    """The sum over the kh*kw taps of ``view_ij @ kernel[i, j]`` (``lowering.shifted_views``)."""
    views = lowering.shifted_views(x, kernel.shape[:2], stride, pad)
    out = 0.0
    for v, w in zip(views, kernel.reshape(-1, *kernel.shape[2:]), strict=True):
        out = out + jnp.einsum("nhwc,cd->nhwd", v, w, preferred_element_type=jnp.float32)
    return out


def conv_auto(x: jax.Array, kernel: jax.Array, stride: int, pad: Pad) -> jax.Array:
    """What ``layers.Conv`` runs on CPU for a dense convolution (``lowering.cpu_conv``)."""
    pad = tuple(map(tuple, pad))
    return (lowering.cpu_conv(kernel.shape, stride, pad) or conv_lax)(x, kernel, stride, pad)


VARIANTS: dict[str, ConvFn] = {
    "lax": conv_lax,
    "im2col": lowering.conv_im2col,
    "taps": conv_taps,
    "dense": lowering.dense_conv,
    "auto": conv_auto,
}


def conv_shapes(arch: str, size: int) -> collections.Counter[Shape]:
    """The groups = 1 convolutions of torchvision's ``arch`` at ``size`` px, with their counts."""
    import torch
    import torchvision

    model = torchvision.models.get_model(arch).eval()
    found: collections.Counter[Shape] = collections.Counter()

    def hook(module, inputs, _):
        if module.groups == 1:
            _, _, h, w = inputs[0].shape
            (kh, kw), (s, _), (ph, pw) = module.kernel_size, module.stride, module.padding
            found[Shape(h, w, module.in_channels, module.out_channels, kh, kw, s, ((ph, ph), (pw, pw)))] += 1

    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    return found


def pullback_fn(conv: ConvFn, shape: Shape) -> Callable:
    """jit of the input VJP vmapped over K cotangents: ``x (1, H, W, Cin)``, ``dy (K, 1, Ho, Wo, Cout)``."""

    def run(x, kernel, dy):
        _, vjp = jax.vjp(lambda x: conv(x, kernel, shape.stride, shape.pad), x)
        return jax.vmap(vjp)(dy)[0]

    return jax.jit(run)


def ascent_fn(conv: ConvFn, shape: Shape) -> Callable:
    """jit of the forward and the input gradient at batch B: ``x (B, H, W, Cin)``, ``g (B, Ho, Wo, Cout)``."""

    def run(x, kernel, g):
        return jax.grad(lambda x: jnp.vdot(conv(x, kernel, shape.stride, shape.pad), g))(x)

    return jax.jit(run)


def call_seconds(fn: Callable, args: Sequence[jax.Array]) -> float:
    """Seconds of one call (already compiled)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def interleaved(fns: dict[str, Callable], args: Sequence[jax.Array], repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` seconds of each function, the functions taking turns in every round."""
    for fn in fns.values():
        jax.block_until_ready(fn(*args))
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(call_seconds(fn, args))
    return {name: min(t) for name, t in times.items()}


def matmul_peak_gflops(n: int = 2048) -> float:
    """GFLOP/s of a float32 ``n x n`` matmul (best of 5), as ``bench_vs_torch.py`` measures it."""
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)).astype(np.float32))
    f = jax.jit(lambda a: a @ a)
    return 2 * n**3 / min(interleaved({"dot": f}, [a], 5).values()) / 1e9


def case_args(shape: Shape, mode: str, k: int, batch: int) -> list[jax.Array]:
    """Random inputs of ``pullback_fn`` (mode ``"vjp"``) or ``ascent_fn`` (``"fwdbwd"``)."""
    rng = np.random.default_rng(0)
    ho, wo = shape.out_hw()
    n = 1 if mode == "vjp" else batch
    x = rng.normal(size=(n, shape.h, shape.w, shape.cin))
    kernel = rng.normal(size=(shape.kh, shape.kw, shape.cin, shape.cout)) / np.sqrt(shape.kh * shape.kw * shape.cin)
    dy = rng.normal(size=(k, 1, ho, wo, shape.cout) if mode == "vjp" else (batch, ho, wo, shape.cout))
    return [jnp.asarray(a, jnp.float32) for a in (x, kernel, dy)]


def profile(shapes: collections.Counter[Shape], mode: str, k: int, batch: int, repeats: int, peak: float) -> None:
    """Print one table row per shape and each variant's seconds summed over the network."""
    make = pullback_fn if mode == "vjp" else ascent_fn
    n = k if mode == "vjp" else batch
    totals = collections.Counter()
    names = list(VARIANTS)
    print(f"\n{mode} at batch {n}: ms per call, GFLOP/s (% of peak)\n")
    print("| shape | count | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for shape, count in shapes.items():
        fns = {name: make(VARIANTS[name], shape) for name in names if name != "taps" or shape.kh * shape.kw > 1}
        times = interleaved(fns, case_args(shape, mode, k, batch), repeats)
        cells = []
        for name in names:
            if name not in times:
                cells.append("-")
                continue
            rate = shape.flops(n) / times[name] / 1e9
            totals[name] += count * times[name]
            cells.append(f"{1e3 * times[name]:.1f} ms, {rate:.0f} ({100 * rate / peak:.0f}%)")
        print(f"| {shape.label()} | {count} | " + " | ".join(cells) + " |", flush=True)
    total_flops = sum(c * s.flops(n) for s, c in shapes.items())
    print(
        "| all, weighted by count | | "
        + " | ".join(  # taps ran on the kxk shapes only
            f"{totals[name]:.2f} s, {total_flops / totals[name] / 1e9:.0f} GFLOP/s" if name != "taps" else "-"
            for name in names
        )
        + " |"
    )


def traced_with(fn: Callable, choice: bool) -> Callable:
    """``jax.jit(fn)`` traced with ``layers.Conv``'s CPU choice (``choice=True``) or with
    ``lax.conv`` and autodiff's transpose for every dense convolution (``False``, the formulation
    before the CPU lowerings). A fresh wrapper per variant: jit objects of the same function share
    their trace, and the second would silently reuse the first's formulation."""
    jitted = jax.jit(lambda *args: fn(*args))

    def run(*args):
        with mock.patch.object(layers, "cpu_conv", lowering.cpu_conv if choice else (lambda *_: None)):
            return jitted(*args)

    return run


def whole_network(arch: str, size: int, k: int, batch: int, modes: Sequence[str], repeats: int) -> None:
    """Print the best seconds of the whole pullback for K labels (mode ``"vjp"``) and of one ascent
    step on ``batch`` pairs (``"fwdbwd"``), ``lax.conv`` everywhere against ``Conv``'s choice."""
    import torch
    import torchvision

    import jaxpull
    import jaxpull_convert
    from jaxpull.core import pullback as explain

    torch.manual_seed(0)
    model = jaxpull_convert.from_torch_module(arch, torchvision.models.get_model(arch).eval())
    rules = jaxpull.resolve()
    rng = np.random.default_rng(0)
    cases = {
        "vjp": (
            explain.pullback_core.__wrapped__,
            f"pullback K={k}",
            (
                model,
                jnp.asarray(rng.uniform(-1, 1, (1, size, size, 3)), jnp.float32),
                jnp.arange(k)[None] % 1000,
                rules,
            ),
        ),
        "fwdbwd": (
            explain.ascent_core.__wrapped__,
            f"ascent step, batch {batch}",
            (
                model,
                jnp.asarray(rng.uniform(-1, 1, (batch, size, size, 3)), jnp.float32),
                jnp.arange(batch)[:, None] * 19 % 1000,
                rules,
                jaxpull.resolve_ascent(steps=1),
            ),
        ),
    }
    for mode in modes:
        fn, name, args = cases[mode]
        times = interleaved({"lax": traced_with(fn, False), "choice": traced_with(fn, True)}, args, repeats)
        print(
            f"\nwhole {name}: lax.conv {times['lax']:.2f} s, Conv's CPU choice {times['choice']:.2f} s "
            f"({times['lax'] / times['choice']:.2f}x)",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--k", type=int, default=100, help="labels per pullback: the VJP's batch")
    parser.add_argument("--batch", type=int, default=50, help="image/label pairs per ascent step")
    parser.add_argument("--modes", default="vjp,fwdbwd")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-whole", action="store_true", help="skip timing the whole network")
    args = parser.parse_args()

    for name in list(VARIANTS):
        if name not in args.variants.split(","):
            del VARIANTS[name]
    peak = matmul_peak_gflops()
    shapes = conv_shapes(args.arch, args.size)
    print(
        f"{args.arch} {args.size}x{args.size}: {len(shapes)} distinct convolutions, {sum(shapes.values())} in all | "
        f"jax {jax.__version__} ({jax.default_backend()}) | float32 matmul peak {peak:.0f} GFLOP/s"
    )
    modes = args.modes.split(",")
    for mode in modes:
        profile(shapes, mode, args.k, args.batch, args.repeats, peak)
    if not args.no_whole:
        whole_network(args.arch, args.size, args.k, args.batch, modes, args.repeats)


if __name__ == "__main__":
    main()
