"""Timing helpers shared by the speed benchmarks: a per-call time robust to noise, cache size."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path


def per_call(fn: Callable[[], object], seconds: float = 0.3, blocks: int = 5) -> float:
    """Median seconds per call of ``fn`` over ``blocks`` blocks of about ``seconds / blocks`` each.

    One warm-up call, then the call count is sized from it, so a slow call is not repeated
    needlessly and a fast one is repeated enough to be above the timer's resolution.
    """
    start = time.perf_counter()
    fn()
    first = max(time.perf_counter() - start, 1e-7)
    calls = max(1, int(seconds / blocks / first))
    times = []
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def last_level_cache_bytes() -> int:
    """The largest CPU cache on this machine (Linux sysfs; 32 MiB when it cannot be read)."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        unit = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * unit)
    return max(sizes, default=32 * 1024**2)


def rotating(items: list, fn: Callable[[object], object]) -> Callable[[], object]:
    """A call that applies ``fn`` to the next of ``items`` each time (weights that are not in cache)."""
    state = {"i": 0}

    def call() -> object:
        state["i"] = (state["i"] + 1) % len(items)
        return fn(items[state["i"]])

    return call
