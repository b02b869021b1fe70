"""What the native decoder's 8-bit activations cost in perplexity: the same packed models through
the PyTorch forward (the weights' perplexity, what every table reports) and through the native
decoder (what `potq generate`, `chat` and `serve` compute).

    .venv/bin/python benchmarks/native_ppl.py      # -> docs/results/native-ppl.md (about 10 minutes)

SmolLM2-135M at 4 and 3 bits (PoT G128, rtn: the packings `potq bench` times), the first 8
WikiText-2 windows of 2048 tokens, both paths on the same windows.
"""

from __future__ import annotations

from pathlib import Path

import torch

import potq
from potq.bench.decode import variant_folder
from potq.bench.timing import machine
from potq.eval import perplexity
from potq.paths import home_dir

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ["pot4", "pot3"]
WINDOWS = 8


def main() -> None:
    torch.set_num_threads(2)
    lines = ["# The native decoder's perplexity", "", "`.venv/bin/python benchmarks/native_ppl.py`", "",
             f"SmolLM2-135M, PoT G128 (rtn), the first {WINDOWS} WikiText-2 windows of 2048 tokens, both paths on "
             f"the same windows; {machine()}.", "",
             "| model | PyTorch forward (fp32) | native decoder (8-bit activations) | native / PyTorch |",
             "|---|---:|---:|---:|"]
    for name in VARIANTS:
        lm = potq.load_model(variant_folder("smollm2-135m", name, home_dir() / "bench"))
        ppl = [perplexity(lm.model, lm.tokenizer, "wikitext2", max_windows=WINDOWS, dtype="fp32", progress=False,
                          native=native).ppl for native in (False, True)]
        lines.append(f"| {name} | {ppl[0]:.2f} | {ppl[1]:.2f} | {ppl[1] / ppl[0]:.3f} |")
        print(lines[-1], flush=True)
    (ROOT / "docs" / "results" / "native-ppl.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
