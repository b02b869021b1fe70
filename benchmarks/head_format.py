"""The output head's format, chosen by what it costs in perplexity and what it gains in speed.

    .venv/bin/python benchmarks/head_format.py      # -> docs/results/head-format.md (about 15 minutes)

SmolLM2-135M ties its output head to the token table, which its GGUF stores as Q8_0; the head is
about two fifths of the bytes a packed token reads. Three heads on the same PoT 4-bit G128 (rtn)
blocks (3-bit rtn blocks are unusable on this model, see rtn-wikitext2.md): the table kept 8-bit
as the GGUF holds it (potq's default: lossless), packed in 4-bit PoT, and in 3-bit PoT. Decoding
speed as `potq bench` measures it (the native decoder; each variant in its own process, in turn,
three rounds, the median); perplexity on the first 8 WikiText-2 windows of 2048 tokens (a quick
estimate: the choice needs the difference between heads) through the PyTorch forward.
"""

from __future__ import annotations

from pathlib import Path

import torch

import potq
from potq.bench.decode import run
from potq.bench.timing import machine
from potq.eval import perplexity
from potq.paths import home_dir

ROOT = Path(__file__).resolve().parent.parent
HEADS = {"8-bit, as the GGUF's Q8_0 (default)": None, "4-bit PoT, G128": 4, "3-bit PoT, G128": 3}
WINDOWS = 8


def folder(table_bits: int | None) -> str:
    """pot4 G128 (rtn) blocks with the token table (= head) kept 8-bit or in PoT, made once."""
    out = home_dir() / "bench" / f"smollm2-135m-pot4-g128-table-{table_bits or 8}"
    if not (out / "potq.json").is_file():
        lm = potq.load_model("smollm2-135m")
        table = False if table_bits is None else potq.QuantConfig("pot", table_bits, 128)
        potq.quantize_(lm, potq.QuantConfig("pot", 4, 128), method="rtn", embeddings=table, progress=False)
        potq.save(lm, out, overwrite=True)
    return str(out)


def main() -> None:
    threads = 2
    folders = {label: folder(bits) for label, bits in HEADS.items()}
    speed = run("smollm2-135m", threads=threads, variants=list(HEADS), folders=folders)
    torch.set_num_threads(threads)
    ppl = {}
    for label, path in folders.items():
        lm = potq.load_model(path)
        ppl[label] = perplexity(lm.model, lm.tokenizer, "wikitext2", max_windows=WINDOWS, progress=False).ppl
    base = next(iter(speed.values()))["tokens_per_s"]
    lines = ["# The output head's format: perplexity against speed", "", "`.venv/bin/python benchmarks/head_format.py`", "",
             f"SmolLM2-135M, PoT 4-bit G128 (rtn) blocks, {threads} decoding threads; this process on {machine()}; "
             "decoding: 64-token prompt, 128 greedy tokens, native decoder, each variant in its own process, in turn, "
             f"3 rounds, median shown; perplexity: the first {WINDOWS} WikiText-2 windows of 2048 tokens.", "",
             "| token table = output head | WikiText-2 ppl (8 windows) | decoding tok/s | vs 8-bit head "
             "| weights read per token (MB) | of which the head (MB) |", "|---|---:|---:|---:|---:|---:|"]
    for label in HEADS:
        r = speed[label]
        lines.append(f"| {label} | {ppl[label]:.2f} | {r['tokens_per_s']:.2f} | {r['tokens_per_s'] / base:.2f}× "
                     f"| {r['weight_bytes_per_token'] / 1e6:.1f} | {r['head_bytes'] / 1e6:.1f} |")
    lines += ["", "Note: rounds (tok/s): " + "; ".join(
        f"{label}: {', '.join(f'{v:.1f}' for v in speed[label]['rounds_tokens_per_s'])}" for label in HEADS) + "."]
    (ROOT / "docs" / "results" / "head-format.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
