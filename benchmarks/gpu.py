"""The GPU path timed on SmolLM2-135M, where a CUDA GPU is present; otherwise a record that it was not.

    .venv/bin/python benchmarks/gpu.py          # -> docs/results/gpu.md

With a GPU: `potq quantize smollm2-135m --method twostep` (3-bit PoT, G64, the thesis schedule)
and `potq eval` (WikiText-2, full test set) with `--device cuda`, each in a fresh process, wall
time and result from the command's own `--json`. Without one, the page says so and names the
machine, so no reader takes a missing number for a measured one.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "out" / "gpu"
STEPS = [("quantize twostep pot 3-bit G64", ["quantize", "smollm2-135m", "--format", "pot", "--bits", "3",
                                            "--group-size", "64", "--method", "twostep", "-o", str(OUT / "pot3"),
                                            "--overwrite"]),
         ("eval WikiText-2 (full)", ["eval", str(OUT / "pot3"), "--dataset", "wikitext2"])]


def run(argv: list[str]) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "potq.cli", *argv, "--device", "cuda", "--quiet", "--json"],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    return {"seconds": time.perf_counter() - start, **json.loads(proc.stdout)}


def main() -> None:
    lines = ["# The GPU path", "", "`.venv/bin/python benchmarks/gpu.py`", ""]
    if not torch.cuda.is_available():
        lines += [f"Not measured: PyTorch sees no CUDA GPU on the machine this page was made on "
                  f"({platform.machine()}, torch {torch.__version__}, {date.today().isoformat()}). The GPU "
                  "code paths (`--device cuda`) are tested only where a GPU is present (`tests/test_device.py` "
                  "skips them otherwise), so they are untested as of this page."]
    else:
        OUT.mkdir(parents=True, exist_ok=True)
        lines += [f"On {torch.cuda.get_device_name()} (torch {torch.__version__}), SmolLM2-135M:", "",
                  "| step | wall time (s) | result |", "| --- | --- | --- |"]
        for label, argv in STEPS:
            r = run(argv)
            result = f"perplexity {r['ppl']:.2f}" if "ppl" in r else f"{r['bits_per_quantized_weight']:.3f} bits/weight"
            lines.append(f"| {label} | {r['seconds']:.1f} | {result} |")
    (ROOT / "docs" / "results" / "gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
