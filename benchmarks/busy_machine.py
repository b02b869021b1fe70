"""Speed on a busy machine: eval, generate and quantize with one other CPU-bound process running.

    .venv/bin/python benchmarks/busy_machine.py      # about 3 minutes on 2 cores -> docs/results/busy-machine.md

Each command runs through the CLI in a fresh process, three ways: on an idle machine with potq's
defaults; with one competing busy process (a Python loop) and potq's defaults (threads = the
cores free now, OpenMP threads that sleep when idle); and with the competitor under the old
defaults (one thread per core, OpenMP's default spin-then-sleep waits). The ratio busy/idle is
what issue 48 asks to keep at 50 % or more.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POTQ = [sys.executable, "-m", "potq.cli"]
WORK = ROOT / "out" / "busy-machine"
PACKED = WORK / "smollm2-pot3"
COMMANDS = {  # label -> (arguments, how to read the speed from --json, its unit)
    "eval (SmolLM2, 2 windows, fp32)": (["eval", "smollm2-135m", "--max-windows", "2", "--dtype", "fp32"],
                                         lambda r: r["tokens_per_s"], "tok/s"),
    "generate (SmolLM2 pot3, 48 tokens)": (["generate", str(PACKED), "--prompt", "The history of the city",
                                            "--max-new-tokens", "48"], lambda r: r["tokens_per_s"], "tok/s"),
    "quantize (SmolLM2, grid, pot3)": (["quantize", "smollm2-135m", "--method", "grid", "--bits", "3", "-o",
                                        str(WORK / "grid"), "--overwrite"], lambda r: 1 / r["seconds"], "runs/s"),
}


def speed(args: list[str], read, env: dict) -> float:  # noqa: ANN001
    run = subprocess.run([*POTQ, *args, "--quiet", "--json"], capture_output=True, text=True, env=env, cwd=ROOT)
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed: {run.stderr[-500:]}")
    return read(json.loads(run.stdout))


def main() -> None:
    base = {**os.environ}
    base.pop("OMP_WAIT_POLICY", None)
    base.pop("POTQ_THREADS", None)
    old = {**base, "OMP_WAIT_POLICY": "", "POTQ_THREADS": str(os.cpu_count())}  # one thread a core, spin waits
    if not (PACKED / "potq.json").is_file():
        subprocess.run([*POTQ, "quantize", "smollm2-135m", "--bits", "3", "-o", str(PACKED), "--overwrite", "-q"],
                       check=True, cwd=ROOT)
    rows = []
    for i, (label, (args, read, unit)) in enumerate(COMMANDS.items(), 1):
        print(f"[{i}/{len(COMMANDS)}] {label}: idle", flush=True)
        idle = speed(args, read, base)
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            print(f"[{i}/{len(COMMANDS)}] {label}: busy, potq's defaults", flush=True)
            busy = speed(args, read, base)
            print(f"[{i}/{len(COMMANDS)}] {label}: busy, one thread a core with spinning waits", flush=True)
            busy_old = speed(args, read, old)
        finally:
            hog.kill()
            hog.wait()
        rows.append((label, unit, idle, busy, busy_old))
    lines = ["# Speed on a busy machine", "", "`.venv/bin/python benchmarks/busy_machine.py`", "",
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; the competitor is one Python "
             "busy loop. Each cell is one run of the command in a fresh process.", "",
             "| command | idle, defaults | busy, defaults | busy / idle | busy, one thread a core, spinning | "
             "busy / idle |", "| --- | --- | --- | --- | --- | --- |"]
    for label, unit, idle, busy, busy_old in rows:
        lines.append(f"| {label} | {idle:.3g} {unit} | {busy:.3g} {unit} | {busy / idle:.0%} | "
                     f"{busy_old:.3g} {unit} | {busy_old / idle:.0%} |")
    out = ROOT / "docs" / "results" / "busy-machine.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-len(rows) - 2:]))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
