"""The README's demo: float vs uniform RTN vs PoT RTN on the default model, end to end.

Quantize twice, save both as potq folders, load them back from disk (never from memory), and
print perplexity on a quick WikiText-2 subset, real bits per weight, size on disk and a short
greedy continuation from each.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import potq
from potq.eval import generate, perplexity
from potq.info import summary

PROMPT = "The capital of France is"


def run_demo(model: str, bits: int, group_size: int, max_windows: int, ctx: int, out: Path) -> None:
    float_lm = potq.load_model(model)
    rows = [_measure("float (Q4_1-expanded, fp32)" if model == "smollm2-135m" else "float",
                     float_lm, max_windows, ctx, bits_per_weight=32.0, file_bytes=None)]
    for config in (potq.UniformConfig(bits, group_size), potq.PoTConfig(bits, group_size)):
        lm = potq.LoadedModel(copy.deepcopy(float_lm.model), float_lm.tokenizer, float_lm.source)
        start = time.perf_counter()
        potq.quantize_(lm.model, config, method="rtn")
        folder = potq.save(lm, out / f"{Path(model).stem}-{config.format}{bits}-g{group_size}", overwrite=True)
        seconds = time.perf_counter() - start
        reloaded = potq.load(folder)
        s = summary(folder)
        print(f"quantized + saved {config.format} {bits}-bit in {seconds:.1f} s -> {folder}")
        rows.append(_measure(f"{config.format} {bits}-bit RTN G{group_size}", reloaded, max_windows, ctx,
                             s["bits_per_quantized_weight"], s["file_bytes"]))
    _print_rows(rows, max_windows, ctx)


def _measure(label: str, lm: potq.LoadedModel, max_windows: int, ctx: int,
             bits_per_weight: float, file_bytes: int | None) -> dict:
    r = perplexity(lm.model, lm.tokenizer, "wikitext2", ctx=ctx, max_windows=max_windows)
    text = generate(lm.model, lm.tokenizer, PROMPT, max_new_tokens=24)
    return {"label": label, "ppl": r.ppl, "windows": r.windows, "total": r.total_windows, "dtype": r.dtype,
            "bpw": bits_per_weight, "bytes": file_bytes, "text": text}


def _print_rows(rows: list[dict], max_windows: int, ctx: int) -> None:
    r0 = rows[0]
    print(f"\nWikiText-2 perplexity on a quick subset: the first {r0['windows']} of {r0['total']} "
          f"windows of {ctx} tokens ({r0['dtype']}); full-set numbers are in README.md")
    print(f"{'model':32} {'ppl':>9} {'bits/weight':>12} {'file MiB':>9}")
    for r in rows:
        size = "-" if r["bytes"] is None else f"{r['bytes'] / 2**20:.1f}"
        print(f"{r['label']:32} {r['ppl']:>9.2f} {r['bpw']:>12.3f} {size:>9}")
    print(f"\nGreedy continuations of {PROMPT!r}:")
    for r in rows:
        print(f"  [{r['label']}] {PROMPT + r['text']!r}")
