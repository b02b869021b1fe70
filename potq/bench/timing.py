"""Timing helpers shared by the benchmarks: a per-call time robust to noise, cache size, and
whether the machine was shared while a long job ran."""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from potq.eval.perplexity import cpu_native_bf16


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


def cpu_name() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def machine() -> str:
    """What a wall time was measured on, e.g. ``AMD EPYC, AVX2, 2 threads``: the sessions that fill
    one result store do not all get the same machine, and a time only compares with its own kind
    (native bf16 is named because it changes bf16 evaluation and training speed severalfold)."""
    capability = torch.backends.cpu.get_cpu_capability() + (" with native bf16" if cpu_native_bf16() else "")
    threads = torch.get_num_threads()
    return f"{cpu_name()}, {capability}, {threads} thread{'s' if threads != 1 else ''}"


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


class LoadWatch:
    """The machine's mean 1-minute load average while a long job runs (sampled every ``every``
    seconds on a background thread): a wall time measured while other work shared the cores is
    not the job's own, and a result table should say so. ``shared(threads)``: the load stayed
    more than one above the job's own thread count."""

    def __init__(self, every: float = 15.0) -> None:
        self.every, self.samples = every, [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> "LoadWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples)

    def shared(self, threads: int) -> bool:
        return self.mean > threads + 1


class PeakMemory:
    """The peak resident memory of this process over a ``with`` block (``peak_bytes``): Linux's
    high-water mark ``VmHWM``, reset on entry through ``/proc/self/clear_refs``, so a row
    measured after a larger one reports its own peak. ``None`` where the mark cannot be reset."""

    def __init__(self) -> None:
        self.peak_bytes: int | None = None
        self._reset = False

    def __enter__(self) -> "PeakMemory":
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._reset = True
        except OSError:
            self._reset = False
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._reset:
            return
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    self.peak_bytes = int(line.split()[1]) * 1024
