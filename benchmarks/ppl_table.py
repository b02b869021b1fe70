"""Perplexity table: float vs quantized rows of one model, each quantized, saved, reloaded from
disk and evaluated with the same windows. Writes a Markdown table and the raw JSON.

    python benchmarks/ppl_table.py --model smollm2-135m --rows float uniform:4 pot:4 uniform:3 pot:3 \
        --dataset wikitext2 --out docs/results/rtn-wikitext2

A row is ``float`` or ``FORMAT:BITS[:METHOD]`` (method default rtn); ``--group-size`` applies to all.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

import potq
from potq.eval import perplexity
from potq.info import summary


def run_row(spec: str, float_lm: potq.LoadedModel, args: argparse.Namespace) -> dict:
    if spec == "float":
        lm, bpw, size, qseconds, label = float_lm, 32.0, None, 0.0, "float"
    else:
        fmt, bits, *rest = spec.split(":")
        method = rest[0] if rest else "rtn"
        config = potq.QuantConfig(fmt, int(bits), args.group_size)
        lm = potq.LoadedModel(copy.deepcopy(float_lm.model), float_lm.tokenizer, float_lm.source)
        start = time.perf_counter()
        potq.quantize_(lm.model, config, method=method)
        qseconds = time.perf_counter() - start
        folder = potq.save(lm, Path(args.work) / f"{fmt}{bits}-{method}-g{args.group_size}")
        lm = potq.load(folder)
        s = summary(folder)
        bpw, size, label = s["bits_per_quantized_weight"], s["file_bytes"], f"{fmt} {bits}-bit {method}"
    result = {"row": spec, "label": label, "bits_per_weight": bpw, "file_bytes": size,
              "quantize_seconds": qseconds}
    for dataset in args.dataset:
        r = perplexity(lm.model, lm.tokenizer, dataset, ctx=args.ctx, max_windows=args.max_windows,
                       dtype=args.dtype)
        result[dataset] = r.to_dict()
        print(f"{label}: {dataset} ppl {r.ppl:.3f} ({r.windows}/{r.total_windows} windows)", flush=True)
    return result


def markdown(results: list[dict], args: argparse.Namespace, command: str) -> str:
    float_name = "float (Q4_1-expanded, fp32)" if args.model == "smollm2-135m" else "float (fp32)"
    head = "| model | bits/weight (incl. scales) | " + " | ".join(f"{d} ppl" for d in args.dataset)
    lines = [head + " | file MiB | quantize s |", "|" + " --- |" * (4 + len(args.dataset))]
    for r in results:
        label = float_name if r["row"] == "float" else r["label"]
        ppls = " | ".join(f"{r[d]['ppl']:.2f}" for d in args.dataset)
        size = "–" if r["file_bytes"] is None else f"{r['file_bytes'] / 2**20:.1f}"
        lines.append(f"| {label} | {r['bits_per_weight']:.3f} | {ppls} | {size} | {r['quantize_seconds']:.1f} |")
    first = results[0][args.dataset[0]]
    return "\n".join([
        f"# {args.model}: perplexity, group size {args.group_size}, ctx {args.ctx}",
        "",
        f"Windows evaluated: {first['windows']} of {first['total_windows']} ({first['dtype']}); "
        "each quantized row is saved, reloaded from disk, then evaluated.",
        f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads.",
        "",
        "```",
        command,
        "```",
        "",
        *lines,
        "",
    ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rows", nargs="+", default=["float", "uniform:4", "pot:4", "uniform:3", "pot:3"])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--dataset", nargs="+", default=["wikitext2"])
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"))
    p.add_argument("--work", default="out/bench", help="where the quantized folders are written")
    p.add_argument("--out", required=True, help="output path without extension (.md and .json are written)")
    args = p.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    float_lm = potq.load_model(args.model)
    results = [run_row(spec, float_lm, args) for spec in args.rows]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": results}, indent=1))
    out.with_suffix(".md").write_text(markdown(results, args, command))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
