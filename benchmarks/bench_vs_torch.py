"""jaxpull against a PyTorch implementation of the method, in one process, on the same inputs.

    python benchmarks/bench_vs_torch.py [--arch resnet50] [--ks 10,100,1000] [--cases a,b,c]

Prints one row per case: compile time (JAX's first call minus a later one), run times (each side's
second call; K > 100: the only call, set-up and compile included), the
torch/JAX time ratio (> 1: jaxpull is faster), the peak RSS increase during the case, and the
achieved GFLOP/s (XLA's cost analysis of the computation) next to this machine's measured float32
matmul peak. Not a test: figures vary with the machine and its load.

Cases (resnet50, 224x224, random weights, float32):
  a) single-step pullbacks of 1 image for K labels: jaxpull.pullback (shared forward; K = 1000
     through jaxpull.sweep in memory-bounded chunks) vs torch with module-swapped gates, the image
     repeated K times in batches of --torch-batch and one backward per batch;
  b) 5-step ascent, 5 images x 10 labels: jaxpull.ascent (all 50 pairs as one batch) vs the
     reference PGA loop batched over the same 50 pairs;
  c) a 16-temperature sweep, 1 image x 1 label: jax.vmap over the temperature (compiles once)
     vs 16 torch calls.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


class PeakRSS:
    """Peak resident memory increase while the block runs (sampled every 5 ms from /proc)."""

    def __enter__(self):
        self.start = self.peak = self._rss()
        self._stop = False
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self):
        while not self._stop:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()
        self.increase = self.peak - self.start


def timed(fn, repeats=1):
    """(first call seconds, best later call seconds, peak RSS increase bytes)."""
    import jax

    with PeakRSS() as mem:
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        first = time.perf_counter() - t0
        later = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            later.append(time.perf_counter() - t0)
    return first, min(later) if later else first, mem.increase


def matmul_peak_gflops() -> float:
    import jax
    import jax.numpy as jnp

    n = 2048
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)).astype(np.float32))
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = min(timed(lambda: f(a), repeats=5)[1:2])
    return 2 * n**3 / best / 1e9


def flops(jitted, *args, **kwargs) -> float:
    cost = jitted.lower(*args, **kwargs).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--ks", default="10,100,1000")
    parser.add_argument("--cases", default="a,b,c")
    parser.add_argument("--torch-batch", type=int, default=25)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="jaxpull's compute dtype (torch stays float32); bfloat16 also prints its cosine to float32")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import torch
    import torchvision

    import jaxpull
    import jaxpull_convert
    import torch_reference as R
    from jaxpull import explain
    from jaxpull import sweep as S

    torch.manual_seed(0)
    tm = torchvision.models.get_model(args.arch).eval()
    model32 = jaxpull_convert.from_torch_module(args.arch, tm)
    model = model32.astype(args.dtype)
    gated = R.gated(tm, 0.3)
    for p in gated.parameters():
        p.requires_grad_(False)
    rng = np.random.default_rng(0)
    x5 = rng.uniform(-1, 1, (5, args.size, args.size, 3)).astype(np.float32)
    x1 = x5[:1]
    peak = matmul_peak_gflops()
    print(f"{args.arch} {args.size}x{args.size} jaxpull {args.dtype} | jax {jax.__version__} ({jax.devices()[0].platform}), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads) | matmul peak {peak:.0f} GFLOP/s")
    print("| case | jax compile s | jax run s | torch run s | torch/jax | jax peak RSS +MiB | torch peak RSS +MiB "
          "| jax GFLOP/s (% of peak) |")
    print("|---|---|---|---|---|---|---|---|")

    def row(name, jax_fn, torch_fn, work_flops, repeats=1):
        jf, jr, jm = timed(jax_fn, repeats)
        _, tr, tmem = timed(torch_fn, repeats)  # torch's first call (oneDNN set-up) is not counted either
        rate = work_flops / jr / 1e9
        print(f"| {name} | {max(jf - jr, 0):.1f} | {jr:.2f} | {tr:.2f} | {tr / jr:.2f} | {jm / 2**20:.0f} | "
              f"{tmem / 2**20:.0f} | {rate:.0f} ({100 * rate / peak:.0f}%) |", flush=True)

    def torch_pullbacks(x, labels, batch):
        xt = torch.from_numpy(x)
        out = []
        for s in range(0, len(labels), batch):
            lab = torch.as_tensor(labels[s : s + batch])
            xb = xt.repeat(len(lab), 1, 1, 1).requires_grad_(True)
            logits = gated(R.normalize(xb))
            (g,) = torch.autograd.grad(logits.gather(1, lab[:, None]).sum(), xb)
            out.append(g)
        return torch.cat(out)

    gating = explain.make_gating(0.3)
    if "a" in args.cases:
        for k in [int(v) for v in args.ks.split(",")]:
            labels = np.arange(k) % 1000
            chunk = min(k, 100)
            per = flops(explain.pullback_core, model, jnp.asarray(x1), jnp.asarray(labels[None, :chunk]), gating,
                        strategy="shared") * (k / chunk)
            if k <= 100:
                jax_fn = lambda: jaxpull.pullback(model, x1, labels)
            else:  # bounded memory: chunks of 100 labels, maps streamed to host
                jax_fn = lambda: S.sweep(model, x1, labels, [0.3], chunk_size=100, progress=False)["maps"]
            # K > 100: one run only (its compile time is included and reported as 0)
            row(f"a) pullback K={k}", jax_fn, lambda: torch_pullbacks(x1, labels, args.torch_batch), per,
                repeats=1 if k <= 100 else 0)
            if args.dtype != "float32" and k <= 100:
                a = np.asarray(jaxpull.pullback(model, x1, labels)).reshape(k, -1).astype(np.float64)
                b = np.asarray(jaxpull.pullback(model32, x1, labels)).reshape(k, -1).astype(np.float64)
                cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
                print(f"a) K={k} {args.dtype} vs float32 maps: cosine min {cos.min():.4f}, median {np.median(cos):.4f}")
    if "b" in args.cases:
        targets = np.arange(10) * 97
        xt, tt = torch.from_numpy(x5), torch.from_numpy(np.tile(targets, (5, 1)))
        args_b = (model, jnp.asarray(x5), jnp.asarray(np.tile(targets, (5, 1))), gating, jnp.int32(1),
                  jnp.float32(20), jnp.float32(100), jnp.float32(0))
        per_step = flops(explain.ascent_core, *args_b)
        row("b) ascent 5 steps, 5 images x 10 labels", lambda: jaxpull.ascent(model, x5, targets),
            lambda: R.ascent(gated, xt, tt), 5 * per_step)
    if "c" in args.cases:
        ts = jnp.geomspace(0.01, 3.0, 16)
        # the model and image are arguments, not closed-over constants (XLA would constant-fold them)
        swept_fn = jax.jit(jax.vmap(lambda t, m, x: explain.pullback_core(m, x, jnp.asarray([[207]]),
                                                                          explain.Gating(t, t), "shared"),
                                    in_axes=(0, None, None)))
        xj = jnp.asarray(x1)
        swept = lambda ts: swept_fn(ts, model, xj)  # noqa: E731
        work = flops(swept_fn, ts, model, xj)

        def torch_sweep():
            out = []
            for t in np.asarray(ts):
                for m in gated.modules():  # retune the swapped gates in place
                    if isinstance(m, (R.GatedReLU, R.SurrogateMaxPool)):
                        m.t = float(t)
                out.append(R.pullback(gated, torch.from_numpy(x1), torch.tensor([[207]])))
            return out

        row("c) 16 temperatures, 1 image x 1 label", lambda: swept(ts), torch_sweep, work)
        before = swept_fn._cache_size()
        swept(ts * 1.5).block_until_ready()
        print(f"c) compilations of the temperature sweep: {swept_fn._cache_size()} (after a second sweep: "
              f"{swept_fn._cache_size() - before} new)")


if __name__ == "__main__":
    main()
