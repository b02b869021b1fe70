"""The output head's format, chosen by what it costs in perplexity and what it gains in speed.

    .venv/bin/python benchmarks/head_format.py      # -> docs/results/head-format.md (about 15 minutes)

SmolLM2-135M ties its output head to the token table, which its GGUF stores as Q8_0; the head is
about two fifths of the bytes a pot3 token reads. Three heads on the same pot3 G128 (rtn) blocks:
the table kept 8-bit as the GGUF holds it (potq's default: lossless), packed in 4-bit PoT, and
packed in 3-bit PoT like the blocks (`--quantize-embeddings same`). Decoding speed as `potq bench`
measures it (the native decoder; each variant in its own process, in turn, three rounds, the
median); perplexity on the first 8 WikiText-2 windows of 2048 tokens (a quick estimate; the
choice needs the difference between heads, not the full-set value) through the PyTorch path.
"""

from __future__ import annotations

from pathlib import Path

import torch

import potq
from potq.bench.decode import POT4_TABLE, run, variant_folder
from potq.bench.timing import machine
from potq.eval import perplexity
from potq.paths import home_dir

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {"pot3": "8-bit, as the GGUF's Q8_0 (default)", POT4_TABLE: "4-bit PoT, G128",
            "pot3 + embeddings": "3-bit PoT, G128 (as the blocks)"}
WINDOWS = 8


def main() -> None:
    threads = 2
    speed = run("smollm2-135m", threads=threads, variants=list(VARIANTS))
    torch.set_num_threads(threads)
    ppl = {}
    for name in VARIANTS:
        lm = potq.load_model(variant_folder("smollm2-135m", name, home_dir() / "bench"))
        ppl[name] = perplexity(lm.model, lm.tokenizer, "wikitext2", max_windows=WINDOWS, progress=False).ppl
    base = speed["pot3"]["tokens_per_s"]
    lines = ["# The output head's format: perplexity against speed", "", "`.venv/bin/python benchmarks/head_format.py`", "",
             f"SmolLM2-135M, pot3 G128 (rtn) blocks, {threads} decoding threads; this process on {machine()}; decoding: "
             "64-token prompt, 128 greedy tokens, native decoder, each variant in its own process, in turn, 3 rounds, "
             f"median shown; perplexity: the first {WINDOWS} WikiText-2 windows of 2048 tokens.", "",
             "| token table = output head | WikiText-2 ppl (8 windows) | decoding tok/s | vs 8-bit head "
             "| weights read per token (MB) | of which the head (MB) |", "|---|---:|---:|---:|---:|---:|"]
    for name, label in VARIANTS.items():
        r = speed[name]
        lines.append(f"| {label} | {ppl[name]:.2f} | {r['tokens_per_s']:.2f} | {r['tokens_per_s'] / base:.2f}× "
                     f"| {r['weight_bytes_per_token'] / 1e6:.1f} | {r['head_bytes'] / 1e6:.1f} |")
    lines += ["", "Note: rounds (tok/s): " + "; ".join(
        f"{name}: {', '.join(f'{v:.1f}' for v in speed[name]['rounds_tokens_per_s'])}" for name in VARIANTS) + "."]
    (ROOT / "docs" / "results" / "head-format.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
