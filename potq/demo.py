"""``potq demo`` (``make demo``): what power-of-two weights are good for, in about three minutes.

At the same size (about 4.2 bits per weight with scales), a 4-bit PoT model decodes much faster
than a 4-bit uniform one on a CPU: its weights stay packed and the fused kernel turns each
multiply into an exponent add, while the uniform model is decoded to float to be computed. The
demo shows that trade-off honestly, end to end on the bundled SmolLM2-135M:

1. load the float model;
2. quantize it to 4-bit uniform (round to nearest, G128: the usual baseline) and to 4-bit PoT with
   the best recipe that takes seconds, not an hour (Step 1's grid search of the group scales,
   weighted by calibration activations, G64); save both, load them back from disk;
3. perplexity of each on a quick WikiText-2 subset, in one dtype for all rows;
4. greedy decoding speed of each (and of llama.cpp's Q4_0 where ``potq[peer]`` is installed);
5. a summary a person reads in ten seconds, and the continuation each model writes.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

import potq
from potq.eval import generate, perplexity
from potq.eval.perplexity import resolve_dtype
from potq.info import summary

PROMPT = "The capital of France is"
CTX = 2048
SPEED_TOKENS = 48
# (label, config, method, settings): the baseline and the best fast PoT recipe at about the same size
RECIPES = [
    ("uniform 4-bit, round to nearest, G128", potq.UniformConfig(4, 128), "rtn", {}),
    ("PoT 4-bit, grid-searched scales, G64", potq.PoTConfig(4, 64), "grid",
     {"objective": "act", "calib_samples": 16, "calib_len": 256, "seed": 0}),
]


class Steps:
    """Labelled steps with elapsed time and an ETA from the expected durations (2-core CPU)."""

    def __init__(self, expected_s: list[tuple[str, float]]) -> None:
        self.expected, self.index, self.start = expected_s, 0, time.perf_counter()

    def next(self) -> None:
        label, _ = self.expected[self.index]
        left = sum(s for _, s in self.expected[self.index:])
        print(f"\n[{self.index + 1}/{len(self.expected)}] {label} "
              f"({time.perf_counter() - self.start:.0f} s so far, about {left:.0f} s left)", flush=True)
        self.index += 1


def run_demo(model: str, max_windows: int, out: Path, threads: int) -> None:
    dtype = resolve_dtype("auto", torch.device("cpu"))
    steps = Steps([("load the float model", 10), ("quantize to 4-bit uniform and 4-bit PoT, save, reload", 45),
                   (f"perplexity on {max_windows} WikiText-2 windows of {CTX} tokens, {dtype}", 10 * max_windows),
                   (f"decoding speed: {SPEED_TOKENS} greedy tokens each, {threads} threads", 20),
                   ("summary", 0)])
    steps.next()
    float_lm = potq.load_model(model)
    rows = [{"label": "float" + (" (Q4_1-expanded)" if model == "smollm2-135m" else ""), "lm": float_lm,
             "bpw": 32.0, "mib": None}]
    steps.next()
    for label, config, method, settings in RECIPES:
        lm = potq.LoadedModel(copy.deepcopy(float_lm.model), float_lm.tokenizer, float_lm.source)
        start = time.perf_counter()
        potq.quantize_(lm, config, method=method, **settings)
        seconds = time.perf_counter() - start
        folder = potq.save(lm, out / f"{Path(model).stem}-{config.format}{config.bits}-{method}", overwrite=True)
        s = summary(folder)
        print(f"  {label}: quantized in {seconds:.1f} s -> {folder}")
        rows.append({"label": label, "lm": potq.load(folder), "bpw": s["bits_per_quantized_weight"],
                     "mib": s["file_bytes"] / 2**20, "float_mib": s["float_bytes"] / 2**20})
    steps.next()
    for row in rows:
        r = perplexity(row["lm"].model, row["lm"].tokenizer, "wikitext2", ctx=CTX, max_windows=max_windows,
                       dtype=dtype)
        row.update(ppl=r.ppl, windows=r.windows, total=r.total_windows)
    steps.next()
    for row in rows:
        row["text"], row["tok_s"] = _decode_speed(row["lm"])
    peer = _llama_cpp(model, threads)
    steps.next()
    _print_summary(rows, peer, dtype, threads)


def _decode_speed(lm: potq.LoadedModel) -> tuple[str, float]:
    """The greedy continuation and its steady decoding speed: tokens after the first one over the
    time they took (the first token carries the prompt and one-off set-up, e.g. a uniform model
    decoding its weights to float)."""
    generate(lm.model, lm.tokenizer, PROMPT, max_new_tokens=4)  # warm-up: kernel, caches
    first: list[float] = []
    text = generate(lm.model, lm.tokenizer, PROMPT, max_new_tokens=SPEED_TOKENS,
                    stream=lambda piece: first or first.append(time.perf_counter()))
    tokens = len(lm.tokenizer.encode(PROMPT + text)) - len(lm.tokenizer.encode(PROMPT))
    return text, (tokens - 1) / (time.perf_counter() - first[0])


def _llama_cpp(model: str, threads: int) -> dict | None:
    """llama.cpp's Q4_0 of the same model, timed the same way, where ``potq[peer]`` is installed."""
    from potq.bench import peer

    if model != "smollm2-135m" or not peer.available():
        print("  llama.cpp: not installed (pip install 'potq[peer]' adds it to this comparison)")
        return None
    from potq.models.registry import resolve

    path = peer.requantized(resolve(model)[1], "Q4_0")
    result = peer.measure(path, prompt_tokens=8, new_tokens=SPEED_TOKENS, threads=threads)
    return {"label": "llama.cpp Q4_0", "tok_s": result["tokens_per_s"], "mib": result["file_mib"],
            "bpw": peer.block_bits_per_weight(path)}


def _print_summary(rows: list[dict], peer: dict | None, dtype: str, threads: int) -> None:
    r0 = rows[0]
    print(f"\nSmolLM2-135M on this CPU ({threads} threads). Perplexity: WikiText-2, first {r0['windows']} of "
          f"{r0['total']} windows of {CTX} tokens, {dtype} (full-set numbers: docs/results/).")
    print(f"{'model':42} {'bits/weight':>11} {'MiB':>7} {'perplexity':>10} {'decode tok/s':>12}")
    for row in rows + ([peer] if peer else []):
        mib = "-" if row.get("mib") is None else f"{row['mib']:.1f}"
        ppl = f"{row['ppl']:.2f}" if "ppl" in row else "-"
        print(f"{row['label']:42} {row['bpw']:>11.3f} {mib:>7} {ppl:>10} {row['tok_s']:>12.1f}")
    uniform, pot = rows[1], rows[2]
    print(f"\nAt about the same size, the PoT model decodes {pot['tok_s'] / uniform['tok_s']:.1f}x as fast as the "
          f"uniform one and {pot['tok_s'] / r0['tok_s']:.1f}x as fast as the float one (steady decoding, after the "
          f"first token): its weights stay packed and each multiply is an exponent add, where uniform weights are "
          f"decoded to float to be computed. The price is quality: perplexity {pot['ppl']:.1f} against "
          f"uniform's {uniform['ppl']:.1f} and float's {r0['ppl']:.1f} (docs/research.md: how far PoT recipes "
          f"close that gap).")
    if pot["float_mib"] >= 1:
        print(f"Of each file, {pot['float_mib']:.0f} MiB are float tensors, almost all the tied embedding/output "
              "head: `--quantize-embeddings` packs it too, at a further perplexity cost; `potq info FOLDER` shows "
              "where the bytes are.")
    else:
        print("The tied embedding/output head stays 8-bit, as the GGUF stored it (losslessly); `potq info FOLDER` "
              "shows where the bytes are.")
    print(f"\nGreedy continuations of {PROMPT!r}:")
    for row in rows:
        print(f"  [{row['label']}] {PROMPT + row['text']!r}")
