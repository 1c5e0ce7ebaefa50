"""How fast the explorer answers: the request handlers of ``jaxpull app`` on EfficientNet-Lite0.

Prints, per kind of request, the first call (which compiles) and the median of later calls with
a different photo, label and temperature (no recompilation). Run with nothing else loading the
CPU: ``python benchmarks/app_latency.py``.
"""

from __future__ import annotations

import statistics
import time

from jaxpull.shell import explorer as ex


def timed(fn, *args):
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    app = ex.Explorer()
    app.model(ex.DEFAULT_LABEL)
    photos = ["chelsea", "coffee", "rocket", "astronaut", "grace_hopper"]
    cases = {
        "explain, excitation pullback, 5 steps": lambda i: app.explain(
            None, photos[i % 5], ex.DEFAULT_LABEL, str(100 + i), "excitation pullback", 5, 20, 100, 0.3 + 0.1 * i, None
        ),
        "explain, both methods, 5 steps": lambda i: app.explain(
            None, photos[i % 5], ex.DEFAULT_LABEL, str(200 + i), "both", 5, 20, 100, 0.3 + 0.1 * i, None
        ),
        "temperature strip, 6 temperatures, 5 steps": lambda i: app.strip(
            None, photos[i % 5], ex.DEFAULT_LABEL, str(300 + i), 5, 20, 100
        ),
    }
    for name, request in cases.items():
        first = timed(request, 0)
        later = [timed(request, i) for i in range(1, 6)]
        print(
            f"{name}: first (compiles) {first:.2f} s; later median {statistics.median(later):.2f} s "
            f"(min {min(later):.2f}, max {max(later):.2f})"
        )


if __name__ == "__main__":
    main()
