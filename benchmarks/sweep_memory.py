"""The sweep planner's memory bound against the memory a unit really takes, on this machine.

    python benchmarks/sweep_memory.py [--arch efficientnet_lite0] [--size 224]

For each method and two chunk sizes (pullback 4 and 32 labels, ascent 2 and 10), a fresh process
compiles the sweep's unit, then runs it once while a thread samples its resident memory every
2 ms; the peak increase over the resident memory before the call, between the two chunk sizes,
is the memory one more label takes. Printed next to the planner's per-label bound
(``jaxpull.core.sweep.footprint``) and XLA's memory analysis of the same compiled units. On
XLA:CPU the device memory is the host's, so the resident memory is what the budget bounds.
Not a test: figures vary with the machine and its load (run it when the machine is quiet).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

ONE = """
import json, os, sys, threading, time
import jax, jax.numpy as jnp, numpy as np
import jaxpull
from jaxpull.core import sweep as core
from jaxpull_convert import testing
arch, size, method, chunk = {arch!r}, {size}, {method!r}, {chunk}
if arch == "efficientnet_lite0":
    import jaxpull_convert
    from jaxpull_convert import sources
    model = jaxpull_convert.from_torch_module(arch, sources.efficientnet_lite0_torch().eval())
else:
    import jaxpull_convert
    model = jaxpull_convert.from_torch_module(arch, testing.random_torchvision_model(arch))
rules, ascent = jaxpull.resolve("excitation"), jaxpull.resolve_ascent("excitation")
m = core.mesh()
x1 = np.zeros((1, size, size, 3), np.float32)
args = core.place(model, x1, np.arange(chunk)[None] % model.num_classes, rules, ascent, m)
compiled = core.unit.lower(*args, method=method, reduce="norms").compile()
stats = compiled.memory_analysis()
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
start = peak = rss()
stop = False
def watch():
    global peak
    while not stop:
        peak = max(peak, rss())
        time.sleep(0.002)
t = threading.Thread(target=watch, daemon=True)
t.start()
jax.block_until_ready(compiled(*args))
stop = True
t.join()
f = core.footprint(model, (size, size, 3), method, rules)
print(json.dumps(dict(peak=peak - start, xla=stats.temp_size_in_bytes + stats.output_size_in_bytes,
                      bound_per_label=f.per_label_bytes, bound_base=f.base_bytes)))
"""


def measure(arch: str, size: int, method: str, chunk: int) -> dict:
    code = ONE.format(arch=arch, size=size, method=method, chunk=chunk)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="efficientnet_lite0")
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    mib = 2**20
    print(f"{args.arch} {args.size}x{args.size}, XLA:CPU, reduce norms ({os.cpu_count()} cores)")
    print(
        "| method | chunks | measured MiB per label | bound MiB per label | bound / measured | XLA analysis MiB per label |"
    )
    print("|---|---|---|---|---|---|")
    for method, (a, b) in (("pullback", (4, 32)), ("ascent", (2, 10))):
        t0 = time.perf_counter()
        small, large = measure(args.arch, args.size, method, a), measure(args.arch, args.size, method, b)
        measured = (large["peak"] - small["peak"]) / (b - a) / mib
        xla = (large["xla"] - small["xla"]) / (b - a) / mib
        bound = large["bound_per_label"] / mib
        print(
            f"| {method} | {a}, {b} | {measured:.1f} | {bound:.1f} | {bound / measured:.2f} | {xla:.1f} |"
            f"  ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    threading.current_thread().name = "main"
    main()
