"""jaxpull against a PyTorch implementation of the method, in one process, on the same inputs.

    python benchmarks/bench_vs_torch.py [--arch resnet50] [--ks 10,100,1000] [--cases a,b,c]
    python benchmarks/bench_vs_torch.py --device cuda --chunk 1000 --torch-batch 250   # on a GPU

On a GPU (``--device cuda``) torch runs on the GPU with TF32 off and JAX with
``jax_default_matmul_precision="highest"`` (both true float32), every timing synchronises the
device, and the memory columns are each library's peak GPU memory instead of peak RSS.

Prints one row per case: compile time (JAX's first call minus a later one), run times (each side's
best later call; ``--repeats R`` > 1 alternates R - 1 more calls of the two sides, so a slow spell of
the machine hits both; K > 100: the only call, set-up and compile included), the second anchor
``torch.compile`` of the same gated model (its compile time, the first call minus its best later call,
and its best later run time; ``--no-torch-compile`` leaves it out), the torch/JAX time ratios (> 1:
jaxpull is faster; eager and compiled), the peak RSS increase during the case, and the
achieved GFLOP/s (XLA's cost analysis of the computation) next to this machine's measured float32
matmul peak, and the rate of XLA's "bytes accessed" (every fused kernel's operands and results,
counted once per kernel) next to the measured bandwidth of an in-place elementwise kernel. Operands
re-read from cache count again, so that rate can pass 100% of the memory bandwidth: a computation
far above it moves more bytes per FLOP than the matmul peak can use (depthwise convolutions,
elementwise gates), one far below both limits has room left. Not a test: figures vary with the
machine and its load.

Cases (resnet50 by default, any torchvision name or efficientnet_lite0 with --arch; 224x224, random weights
(efficientnet_lite0: its real ones), float32):
  a) single-step pullbacks of 1 image for K labels: jaxpull.pullback (shared forward; K = 1000
     through jaxpull.shell.sweep in memory-bounded chunks) vs torch with module-swapped gates, the image
     repeated K times in batches of --torch-batch and one backward per batch;
  b) 5-step ascent, 5 images x 10 labels: jaxpull.ascent (all 50 pairs as one batch) vs the
     reference PGA loop batched over the same 50 pairs;
  c) a 16-temperature sweep, 1 image x 1 label: jax.vmap over the temperature (compiles once)
     vs 16 torch calls.
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import numpy as np


class PeakJaxGPU:
    """JAX's peak GPU memory above what it held when the block started (its allocator's counter;
    JAX cannot reset its peak, so a block that stays below an earlier peak reports 0)."""

    def __enter__(self):
        self.start = _jax_gpu_bytes("bytes_in_use")
        return self

    def __exit__(self, *exc):
        self.increase = max(_jax_gpu_bytes("peak_bytes_in_use") - self.start, 0)


class PeakTorchGPU:
    """torch's peak allocated GPU memory while the block runs."""

    def __enter__(self):
        import torch

        torch.cuda.reset_peak_memory_stats()
        self.start = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        import torch

        self.increase = torch.cuda.max_memory_allocated() - self.start


def _jax_gpu_bytes(key: str) -> int:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return int(stats.get(key, 0))


GPU = False  # set by --device cuda: memory columns are GPU memory


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


def timed(fn, repeats=1, memory=None):
    """(first call seconds, best later call seconds, peak memory increase bytes)."""
    import jax

    with (memory or PeakRSS)() as mem:
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
    """Best of 20 square float32 matmuls (about 2 s on 2 cores): fewer let one slow spell of a shared
    machine halve the figure (a 5-call best once read 101 against 183-190 in the processes around it)."""
    import jax
    import jax.numpy as jnp

    n = 2048 if jax.devices()[0].platform == "cpu" else 8192
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)).astype(np.float32))
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = timed(lambda: f(a), repeats=20)[1]
    return 2 * n**3 / best / 1e9


def bandwidth_gbs() -> float:
    """Best of 20 calls of ``a * 1.5 + 1.0`` on 256 MiB of float32, in place (the buffer donated),
    in GB/s: the memory bandwidth of one fused elementwise kernel that reads and writes every
    element once. In place, because a fresh 256 MiB result is page-faulted in by the kernel on
    every call here (glibc maps large blocks anew each time), which alone took 100 ms of a 110 ms
    call: that is a cost of the allocator, not of the memory."""
    import jax
    import jax.numpy as jnp

    a = jnp.asarray(np.random.default_rng(0).random(2**26, dtype=np.float32))
    f = jax.jit(lambda a: a * 1.5 + 1.0, donate_argnums=0)
    a = f(a).block_until_ready()
    best = float("inf")
    for _ in range(20):
        t0 = time.perf_counter()
        a = f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * a.nbytes / best / 1e9


def cost(jitted, *args, **kwargs) -> np.ndarray:
    """``[FLOPs, bytes accessed]`` of one call, from XLA's cost analysis (nan where it has none)."""
    # XLA's GPU backend offers no cost analysis (None): then the columns read nan, and the counts
    # of the same computation can be taken from a CPU run of this script.
    c = jitted.lower(*args, **kwargs).cost_analysis()
    c = (c[0] if isinstance(c, (list, tuple)) else c) or {}
    return np.array([c.get("flops", np.nan), c.get("bytes accessed", np.nan)], dtype=np.float64)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--ks", default="10,100,1000")
    parser.add_argument("--cases", default="a,b,c")
    parser.add_argument(
        "--rules",
        default="excitation",
        choices=["excitation", "semantic"],
        help="the rules preset of both sides (semantic for ViT / ConvNeXt / Swin: GELU, LayerNorm, attention)",
    )
    parser.add_argument("--torch-batch", type=int, default=25)
    parser.add_argument("--chunk", type=int, default=100, help="labels per jaxpull call for K > chunk (sweep)")
    parser.add_argument(
        "--repeats", type=int, default=1, help="later calls per side, alternating jaxpull and torch; best one counts"
    )
    parser.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="cuda: torch on the GPU (TF32 off), JAX at highest matmul precision",
    )
    parser.add_argument(
        "--no-torch-compile",
        dest="torch_compile",
        action="store_false",
        help="leave out the torch.compile column (it compiles for minutes on a CPU)",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="jaxpull's compute dtype (torch stays float32); bfloat16 also prints its cosine to float32",
    )
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")

    import jax
    import jax.numpy as jnp
    import torch
    import torchvision

    global GPU
    device = torch.device(args.device)
    if args.device == "cuda":
        jax.config.update("jax_default_matmul_precision", "highest")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        GPU = True

    import jaxpull
    import jaxpull_convert
    from jaxpull.core import pullback
    from jaxpull.shell import sweep as S
    from jaxpull_convert import torch_reference as R

    torch.manual_seed(0)
    if args.arch == "efficientnet_lite0":  # not torchvision's: the package's real weights
        from jaxpull_convert import sources

        tm = sources.efficientnet_lite0_torch().eval()
        tm.load_state_dict(torch.load(sources.efficientnet_lite0_file(), weights_only=True))
    else:
        tm = torchvision.models.get_model(args.arch).eval()
    model32 = jaxpull_convert.from_torch_module(args.arch, tm)
    model = model32.astype(args.dtype)
    rules = jaxpull.resolve(args.rules)
    gated = R.gated(tm, rules).to(device)
    for p in gated.parameters():
        p.requires_grad_(False)
    # the second anchor: the same gated model under torch.compile (inductor), forward and backward. Shapes
    # static (torch's default): dynamic=True fails to trace the reference's autograd.Functions in torch
    # 2.14 (their temperatures are Python floats); a second batch size recompiles, within its compile time.
    compiled = torch.compile(gated) if args.torch_compile else None
    rng = np.random.default_rng(0)
    x5 = rng.uniform(-1, 1, (5, args.size, args.size, 3)).astype(np.float32)
    x1 = x5[:1]
    peak = matmul_peak_gflops()
    bandwidth = bandwidth_gbs()
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} threads"
    print(
        f"{args.arch} {args.size}x{args.size} jaxpull {args.dtype} | jax {jax.__version__} ({jax.devices()[0].device_kind}), "
        f"torch {torch.__version__} ({where}) | float32 matmul peak {peak:.0f} GFLOP/s | "
        f"elementwise bandwidth {bandwidth:.1f} GB/s"
    )
    mem = "peak RSS" if args.device == "cpu" else "peak GPU memory"
    print(
        f"| case | jax compile s | jax run s | torch run s | torch.compile compile s | torch.compile run s "
        f"| torch/jax | torch.compile/jax | jax {mem} +MiB | torch {mem} +MiB "
        "| jax GFLOP/s (% of peak) | jax GB/s (% of bandwidth) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")

    def synced(fn):
        def run():
            out = fn()
            if args.device == "cuda":
                torch.cuda.synchronize()
            return out

        return run

    def row(name, jax_fn, torch_fn, work, repeats=1, compiled_fn=None):
        """One case: jaxpull, eager torch and (``compiled_fn``) torch.compile, each its first and best later call."""
        torch_fn = synced(torch_fn)
        jf, jr, jm = timed(jax_fn, repeats, PeakJaxGPU if GPU else None)
        _, tr, tmem = timed(
            torch_fn, repeats, PeakTorchGPU if GPU else None
        )  # torch's first call (oneDNN set-up) is not counted either
        cf = cr = float("nan")
        if compiled_fn is not None:
            compiled_fn = synced(compiled_fn)
            cf, cr, _ = timed(compiled_fn, max(repeats, 1))  # the first call compiles (forward and backward)
        for _ in range(args.repeats - 1 if repeats else 0):  # alternating: drift in the machine's speed hits both
            jr = min(jr, timed(jax_fn, 0)[0])
            tr = min(tr, timed(torch_fn, 0)[0])
            if compiled_fn is not None:
                cr = min(cr, timed(compiled_fn, 0)[0])
        rate, traffic = work / jr / 1e9
        compile_cells = (
            "n/a | n/a | n/a" if compiled_fn is None else f"{max(cf - cr, 0):.1f} | {cr:.3f} | {cr / jr:.2f}"
        )
        c_compile, c_run, c_ratio = compile_cells.split(" | ")
        print(
            f"| {name} | {max(jf - jr, 0):.1f} | {jr:.3f} | {tr:.3f} | {c_compile} | {c_run} | {tr / jr:.2f} | "
            f"{c_ratio} | {jm / 2**20:.0f} | {tmem / 2**20:.0f} | {rate:.0f} ({100 * rate / peak:.0f}%) | "
            f"{traffic:.1f} ({100 * traffic / bandwidth:.0f}%) |",
            flush=True,
        )

    def torch_pullbacks(x, labels, batch, net=gated):
        xt = torch.from_numpy(x).to(device)
        out = []
        for s in range(0, len(labels), batch):
            lab = torch.as_tensor(labels[s : s + batch], device=device)
            xb = xt.repeat(len(lab), 1, 1, 1).requires_grad_(True)
            logits = net(R.normalize(xb))
            (g,) = torch.autograd.grad(logits.gather(1, lab[:, None]).sum(), xb)
            out.append(g)
        return torch.cat(out)

    if "a" in args.cases:
        for k in [int(v) for v in args.ks.split(",")]:
            labels = np.arange(k) % 1000
            chunk = min(k, args.chunk)
            per = cost(pullback.pullback_core, model, jnp.asarray(x1), jnp.asarray(labels[None, :chunk]), rules) * (
                k / chunk
            )
            if k <= args.chunk:
                jax_fn = lambda labels=labels: jaxpull.pullback(model, x1, labels, rules=args.rules)
            else:  # bounded memory: chunks of --chunk labels, maps streamed to host
                jax_fn = lambda labels=labels: S.sweep(
                    model,
                    x1,
                    labels,
                    [float(rules.relu.temperature)],
                    rules=args.rules,
                    chunk_size=args.chunk,
                    progress=False,
                )["maps"]
            # K > chunk: one run only (its compile time is included and reported as 0)
            row(
                f"a) {args.rules} pullback K={k}",
                jax_fn,
                lambda labels=labels: torch_pullbacks(x1, labels, args.torch_batch),
                per,
                repeats=1 if k <= args.chunk else 0,
                compiled_fn=None
                if compiled is None
                else lambda labels=labels: torch_pullbacks(x1, labels, args.torch_batch, compiled),
            )
            if args.dtype != "float32" and k <= 100:
                a = np.asarray(jaxpull.pullback(model, x1, labels)).reshape(k, -1).astype(np.float64)
                b = np.asarray(jaxpull.pullback(model32, x1, labels)).reshape(k, -1).astype(np.float64)
                cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
                print(f"a) K={k} {args.dtype} vs float32 maps: cosine min {cos.min():.4f}, median {np.median(cos):.4f}")
    if "b" in args.cases:
        targets = np.arange(10) * 97
        xt, tt = torch.from_numpy(x5).to(device), torch.from_numpy(np.tile(targets, (5, 1))).to(device)
        args_b = (
            model,
            jnp.asarray(x5),
            jnp.asarray(np.tile(targets, (5, 1))),
            rules,
            jaxpull.resolve_ascent(args.rules, steps=1),
        )
        per_step = cost(pullback.ascent_core, *args_b)
        eps = jaxpull.resolve_ascent(args.rules).eps
        row(
            "b) ascent 5 steps, 5 images x 10 labels",
            lambda: jaxpull.ascent(model, x5, targets, rules=args.rules),
            lambda: R.ascent(gated, xt, tt, eps=eps),
            5 * per_step,
            compiled_fn=None if compiled is None else lambda: R.ascent(compiled, xt, tt, eps=eps),
        )
    if "c" in args.cases:
        ts = jnp.geomspace(0.01, 3.0, 16)
        # the model and image are arguments, not closed-over constants (XLA would constant-fold them)
        swept_fn = jax.jit(
            jax.vmap(
                lambda t, m, x: pullback.pullback_core(
                    m, x, jnp.asarray([[207]]), jaxpull.resolve(args.rules, temperature=t, pool_temperature=t)
                ),
                in_axes=(0, None, None),
            )
        )
        xj = jnp.asarray(x1)
        swept = lambda ts: swept_fn(ts, model, xj)  # noqa: E731
        work = cost(swept_fn, ts, model, xj)

        def torch_sweep():
            out = []
            for t in np.asarray(ts):
                for m in gated.modules():  # retune the swapped gates in place
                    if isinstance(m, (R.GatedReLU, R.SurrogateMaxPool)):
                        m.t = float(t)
                out.append(R.pullback(gated, torch.from_numpy(x1).to(device), torch.tensor([[207]], device=device)))
            return out

        # no torch.compile column here: the reference keeps each temperature as a Python float in the
        # module, so torch.compile would recompile for every temperature
        row("c) 16 temperatures, 1 image x 1 label", lambda: swept(ts), torch_sweep, work)
        before = swept_fn._cache_size()
        swept(ts * 1.5).block_until_ready()
        print(
            f"c) compilations of the temperature sweep: {swept_fn._cache_size()} (after a second sweep: "
            f"{swept_fn._cache_size() - before} new)"
        )


if __name__ == "__main__":
    main()
