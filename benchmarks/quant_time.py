"""Quantization time (thesis Table 4.7 style): Step 1 measured here over every linear layer of
the model, and every stored run's total and per-block time from the ``ppl_table.py`` store.

    python benchmarks/quant_time.py --model smollm2-135m --out docs/results/quantize-time

Speed targets: Step 1 over all linear layers of SmolLM2-135M under 30 s on 2 cores and twostep at
the fast calibration default (32×512) under 30 minutes (issue 4); GPTQ with the PoT format at
3 bits under 15 minutes (issue 5). The stored runs' verdicts are printed with the table.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

import potq
from potq.bench.timing import machine
from potq.formats import get_format
from potq.methods.grid import search_scales
from potq.paths import write_text_atomic
from potq.quantize import quantizable_layers
from ppl_table import machine_lines, machine_marks, machine_of


def step1_seconds(model: torch.nn.Module, fmt_name: str, bits: int, group_size: int) -> float:
    fmt = get_format(fmt_name, bits)
    start = time.perf_counter()
    for layer in quantizable_layers(model).values():
        search_scales(layer.weight.detach(), fmt, group_size)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--store", default=None, help="ppl_table.py store (default docs/results/MODEL-runs.json)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    model = potq.load_model(args.model).model
    n = sum(m.weight.numel() for m in quantizable_layers(model).values())
    lines = [f"# {args.model}: quantization time", "",
             f"Step 1 measured now on {machine()}, torch {torch.__version__}.", "", "```", command, "```", "",
             f"## Step 1 (grid search of b ∈ 0.01..2.00) over all {n / 1e6:.1f} M linear weights, "
             f"G{args.group_size}", "", "| format | bits | seconds | target |", "| --- | --- | --- | --- |"]
    for fmt_name in ("pot", "pot-zero"):
        for bits in (2, 3, 4):
            s = step1_seconds(model, fmt_name, bits, args.group_size)
            lines.append(f"| {fmt_name} | {bits} | {s:.1f} | {'met' if s < 30 else 'MISSED'} (< 30 s) |")
            print(lines[-1], flush=True)
    store = Path(args.store or f"docs/results/{args.model}-runs.json")
    runs = json.loads(store.read_text()) if store.exists() else {}
    lines += ["", "## Targets of whole runs (from the ppl_table.py store)", ""] + run_verdicts(runs)
    lines += ["", "## Every stored run (from the ppl_table.py store; calibration 32×512 unless the row names "
              "another)", "",
              "| run | method | total s | block-wise s | blocks | s per block | epochs | s per block-epoch |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    marks = machine_marks(list(runs.values()))
    for spec, r in runs.items():
        if spec == "float":
            continue
        blocks = [b for b in r.get("blocks") or [] if "seconds" in b and "loss" in b]  # trained blocks only
        wise = sum(b["seconds"] for b in blocks)
        epochs = len(blocks[0]["loss"]) - 1 if blocks else 0
        per = f"{wise / len(blocks):.1f}" if blocks else "–"
        per_epoch = f"{wise / len(blocks) / epochs:.2f}" if blocks and epochs else "–"
        total = f"{r['quantize_seconds']:.1f}{_shared(r)}{marks.get(machine_of(r), '')}"
        lines.append(f"| {spec} | {r.get('method')} | {total} | "
                     f"{wise:.1f} | {len(blocks) or '–'} | {per} | {epochs or '–'} | {per_epoch} |")
    lines += ["", "Block-wise time includes Step 1 of the block, the calibration forward passes, the "
              "epochs and one evaluation pass per epoch. \\* quantized while other jobs shared the cores: "
              "that time is not representative (an upper bound).", "",
              *machine_lines(list(runs.values())), ""]
    print(write_text_atomic(Path(args.out).with_suffix(".md"), "\n".join(lines)).read_text())


# run -> (target seconds, what): whole-run targets checked against the store
RUN_TARGETS = {"pot:3:twostep": (1800, "twostep, zero-excluded PoT 3-bit, 32×512 calibration"),
               "pot-zero:3:twostep": (1800, "twostep, PoT with zero 3-bit, 32×512 calibration"),
               "pot:2:twostep": (1800, "twostep, zero-excluded PoT 2-bit (40 epochs, 4× the 3-bit default)"),
               "pot-zero:2:twostep": (1800, "twostep, PoT with zero 2-bit (40 epochs)"),
               "pot:3:gptq": (900, "GPTQ with the PoT format, 3-bit")}


def _shared(r: dict) -> str:
    return "*" if r.get("shared_machine") else ""


def run_verdicts(runs: dict) -> list[str]:
    """One line per run target: its stored time and whether it is under the target."""
    lines = []
    for spec, (limit, what) in RUN_TARGETS.items():
        r = runs.get(spec)
        if r is None:
            lines.append(f"- {what} (`{spec}`): not measured yet (target < {limit // 60} min)")
            continue
        t = r["quantize_seconds"]
        verdict = "met" if t < limit else ("not judged: the cores were shared" if r.get("shared_machine")
                                           else "MISSED")
        lines.append(f"- {what} (`{spec}`): {t / 60:.1f}{_shared(r)} min (target < {limit // 60} min) — {verdict} "
                     f"(on {machine_of(r)})")
    return lines


if __name__ == "__main__":
    main()
