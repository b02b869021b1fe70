"""How many threads to compute on, and how they wait: chosen so a busy machine does not collapse.

PyTorch starts one thread per core and its OpenMP workers spin while they wait for work. On a
machine where another process already keeps a core busy, every parallel region then waits for a
thread that is not running, and spinning threads steal the time it needs: `potq generate` fell
from 55 to 0.6 tokens/s that way. So the command line

- by default uses only the cores that are free now: the core count less the cores other
  processes kept busy over a short sample of ``/proc/stat`` (at least one), and
- where that sample finds other work, makes OpenMP threads sleep instead of spin when idle
  (``OMP_WAIT_POLICY=PASSIVE``, set before torch is imported, unless the user set it). On an idle
  machine the threads keep OpenMP's short spin: decoding a small model makes hundreds of short
  parallel calls a token, and waking sleeping threads for each halved its speed
  (docs/results/busy-machine.md). A competitor that starts after potq does can still slow it.

``--threads N`` (or ``POTQ_THREADS``) overrides the count; measured in docs/results/busy-machine.md.
"""

from __future__ import annotations

import os
import time

SAMPLE_S = 0.1


SET_BY_POTQ = "POTQ_SET_OMP_WAIT_POLICY"  # marks a wait policy potq chose, not the user


def prefer_sleeping_threads() -> None:
    """OpenMP workers sleep when idle where other work is running now (must run before torch is
    first imported); a policy the user set stays."""
    if "OMP_WAIT_POLICY" not in os.environ and _busy() >= 0.5:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.environ[SET_BY_POTQ] = "1"


def user_environment() -> dict[str, str]:
    """This process's environment without the wait policy potq chose: for a peer program that
    should run as it would on its own (llama.cpp in the speed benchmark)."""
    env = dict(os.environ)
    if env.pop(SET_BY_POTQ, None):
        env.pop("OMP_WAIT_POLICY", None)
    return env


_sample: float | None = None


def _busy() -> float:
    """:func:`busy_cores`, sampled once per process (the wait policy and the thread count share it)."""
    global _sample
    if _sample is None:
        _sample = busy_cores()
    return _sample


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat, or None off Linux."""
    try:
        with open("/proc/stat") as stream:
            fields = [int(v) for v in stream.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_cores(sample_s: float = SAMPLE_S) -> float:
    """How many cores other processes keep busy right now (0 where it cannot be measured)."""
    before = _cpu_times()
    time.sleep(sample_s)
    after = _cpu_times()
    if before is None or after is None or after[1] == before[1]:
        return 0.0
    return (after[0] - before[0]) / (after[1] - before[1]) * available_cores()


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def default_threads() -> int:
    """``POTQ_THREADS``, else the cores not busy with other work now (at least 1)."""
    env = os.environ.get("POTQ_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, round(available_cores() - _busy()))


def apply(threads: int | None) -> int:
    """Set torch's intra-op thread count to ``threads`` (None: :func:`default_threads`)."""
    import torch

    count = threads or default_threads()
    torch.set_num_threads(count)
    return count
