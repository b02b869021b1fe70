"""Ablation: the GGUF's Q8_0 token table kept 8-bit (its output head read by the int8 GEMV) vs held in float32.

    .venv/bin/python benchmarks/int8_table.py      # -> docs/results/int8-table.md (a few minutes)

SmolLM2-135M's GGUF stores the token table, which is also the output head, as Q8_0; potq packs it
back onto the same 8-bit grid (lossless: the same values) instead of expanding it to float32.
Both variants are pot3 G128 (rtn): decoding speed measured as `potq bench` measures it (each
variant in its own process, in turn, three rounds, the median) and the weight bytes a token
reads. Perplexity is not measured: the table's values are the same in both.
"""

from __future__ import annotations

import os
from pathlib import Path

from potq.bench.decode import FLOAT_TABLES, run
from potq.bench.timing import machine

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = [FLOAT_TABLES, "pot3"]


def main() -> None:
    threads = 2
    results = run("smollm2-135m", threads=threads, variants=VARIANTS)
    base = results[FLOAT_TABLES]["tokens_per_s"]
    lines = ["# The Q8_0 token table kept 8-bit: decoding speed", "", "`.venv/bin/python benchmarks/int8_table.py`", "",
             f"SmolLM2-135M, pot3 G128 (rtn), {threads} decoding threads; this process on {machine()}; "
             "64-token prompt, 128 greedy tokens, "
             "each variant in its own process, in turn, 3 rounds, median shown.", "",
             "| token table / output head | decoding tok/s | vs float32 table | weights read per token (MB) | "
             "of which the head (MB) | peak RSS (MiB) |", "|---|---:|---:|---:|---:|---:|"]
    for name in VARIANTS:
        r = results[name]
        label = "float32 (before)" if name == FLOAT_TABLES else "8-bit, as the GGUF's Q8_0 (now)"
        lines.append(f"| {label} | {r['tokens_per_s']:.2f} | {r['tokens_per_s'] / base:.2f}× | "
                     f"{r['weight_bytes_per_token'] / 1e6:.1f} | {r['head_bytes'] / 1e6:.1f} | {r['peak_rss_mib']:.0f} |")
    lines += ["", "Note: rounds (tok/s): " + "; ".join(
        f"{name}: {', '.join(f'{v:.1f}' for v in results[name]['rounds_tokens_per_s'])}" for name in VARIANTS)
        + f". CPU count {os.cpu_count()}; other work on the machine shifts absolute speeds, the ratio is from one run."]
    (ROOT / "docs" / "results" / "int8-table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
