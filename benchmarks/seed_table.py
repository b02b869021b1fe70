"""The seed's Table 3 ("PoT weights in LLMs"): uniform at 6/8/16/32 bits vs PoT at its 4/5/6 bits,
through the PT2E flow, weights only and weights + embedding tables, with cross-entropy, perplexity
and one generated sample per row; plus its epsilon sweep and potq's own 3-/2-bit two-step rows.

    python benchmarks/seed_table.py --model nanogpt-shakespeare
    python benchmarks/seed_table.py --model smollm2-135m --max-windows 8 --twostep

Rows (every one exported, prepared, converted by ``potq.pt2e`` and scored on the converted graph):
``int:B`` is PT2E's own symmetric per-channel integer weights (the seed's "normal quantization"),
``seed:S`` the seed's PoT grid at its S bits — exponents [-(2^(S-1)-1), 2^(S-1)-1] plus sign and
zero, stored in S+1 bits (potq's ``pot-seed`` format, per output channel). ``twostep:FMT:B`` rows
go through ``potq quantize --method twostep`` instead (PT2E does not learn scales).

Every measurement is kept in ``docs/results/seed-pot-weights-MODEL.json`` (resumable: rows already
measured with the same windows are not redone) and the Markdown is rebuilt from all stored models.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

import potq
import result_store
from potq.eval import generate, perplexity
from potq.eval.data import home_dataset
from potq.eval.perplexity import max_positions
from potq.paths import write_text_atomic
from potq.pt2e import TorchInt, quantize_pt2e

RESULTS = Path("docs/results")
MD = RESULTS / "seed-pot-weights.md"
TABLE_ROWS = ["float", "int:6", "int:8", "int:16", "int:32", "seed:4", "seed:5", "seed:6"]
EPSILONS = [0.0, 1e-8, 1e-4, 1e-2, 0.1, 0.3, 1.0]
PROMPTS = {"shakespeare": "ROMEO:\n", "wikitext2": "The history of the city"}


def weights_of(row: str, epsilon: float | None):
    """The PT2E weight spec of a row name, or None for the float model."""
    kind, _, bits = row.partition(":")
    if kind == "float":
        return None
    if kind == "int":
        return TorchInt(int(bits))
    options = {} if epsilon is None else {"epsilon": epsilon}
    return potq.QuantConfig("pot-seed", int(bits) + 1, -1, options)


def stored_bits(row: str) -> str:
    """Bits of one weight's code (scales come on top: one fp16 per row or group)."""
    kind, _, bits = row.partition(":")
    if kind == "float":
        return "32"
    if kind == "seed":
        return str(int(bits) + 1)
    return bits.split(":")[-1]


def measure(lm: potq.LoadedModel, row: str, embeddings: bool, epsilon: float | None, args) -> dict:
    """Quantize (PT2E, or potq's two-step path), then cross-entropy, perplexity and a sample."""
    start = time.perf_counter()
    if row.startswith("twostep:"):
        _, fmt, bits = row.split(":")
        model = copy.deepcopy(lm.model)
        potq.quantize_(potq.LoadedModel(model, lm.tokenizer, lm.source), potq.QuantConfig(fmt, int(bits), args.group_size),
                       method="twostep", embeddings=embeddings, progress=False, calib_len=min(512, args.ctx))
    else:
        weights = weights_of(row, epsilon)
        model = lm.model if weights is None else quantize_pt2e(lm, weights, embeddings=embeddings)
    quantize_s = time.perf_counter() - start
    r = perplexity(model, lm.tokenizer, args.dataset, ctx=args.ctx, max_windows=args.max_windows, dtype="fp32",
                   progress=False)
    prompt = PROMPTS.get(args.dataset, "The")
    sample = generate(model, lm.tokenizer, prompt, max_new_tokens=args.sample_tokens)
    return {"ce": r.nll, "ppl": r.ppl, "windows": r.windows, "total_windows": r.total_windows, "ctx": r.ctx,
            "dataset": args.dataset, "quantize_s": round(quantize_s, 1), "prompt": prompt, "sample": sample}


def key(row: str, embeddings: bool, epsilon: float | None) -> str:
    return f"{row}|{'w+emb' if embeddings else 'w'}" + ("" if epsilon is None else f"|eps={epsilon:g}")


def run(args) -> None:
    store_path = RESULTS / f"seed-pot-weights-{Path(args.model).name}.json"
    store = result_store.load(store_path)
    lm = potq.load_model(args.model)
    args.dataset = args.dataset or home_dataset(lm.source)
    args.ctx = args.ctx or min(2048, max_positions(lm.model) or 2048)
    rows = [(r, e, None) for r in TABLE_ROWS + args.twostep for e in (False, True) if not (r == "float" and e)]
    rows += [("seed:4", True, eps) for eps in EPSILONS]
    for row, emb, eps in rows:
        k = key(row, emb, eps)
        old = store["runs"].get(k)
        if old and (old["ctx"], old["windows"], old["dataset"]) == (args.ctx, args.max_windows or old["total_windows"],
                                                                   args.dataset):
            continue
        print(f"{args.model} {k} ...", flush=True)
        store["runs"][k] = measure(lm, row, emb, eps, args)
        store["torch_threads"] = torch.get_num_threads()
        store["source"] = {k2: v for k2, v in lm.source.items() if k2 != "training"}
        store["training"] = lm.source.get("training", {}).get("history", [{}])[-1]
        result_store.save(store_path, store)
        print(f"  ce {store['runs'][k]['ce']:.4f} ppl {store['runs'][k]['ppl']:.2f}", flush=True)
    write_markdown()


def write_markdown() -> None:
    """docs/results/seed-pot-weights.md from every stored model."""
    out = ["# The seed's Table 3: uniform vs PoT through PT2E (\"PoT weights in LLMs\")", "",
           "Weights quantized through the PyTorch 2 export flow (`potq.pt2e`): `int B` is PT2E's own symmetric",
           "per-channel integers, `PoT S` the seed's grid `sign·s·2^clip(round(log2(|x|/s + ε)), -E, E)` with",
           "E = 2^(S-1)-1 (its \"4 bits\" = [-7, 7]); a stored code also needs the sign and zero, so the real",
           "cost is S+1 bits (+ one fp16 scale per output row). `w` = linear weights of the blocks,",
           "`w+emb` = also the token/position tables and the tied output head. Activations in float (the",
           "seed's GPT-2 setting). Cross-entropy in nats per token on held-out text never trained on.", ""]
    for model, store in result_store.stored(RESULTS, "seed-pot-weights"):
        runs = store["runs"]
        any_run = next(iter(runs.values()))
        out += [f"## {model}", "", f"`{store['command']}`", "",
                f"{any_run['dataset']}, ctx {any_run['ctx']}, {any_run['windows']} of {any_run['total_windows']} "
                f"windows; {store['torch_threads']} threads."]
        if store.get("training", {}).get("val"):
            t = store["training"]
            out.append(f"Trained with `potq train-char` to step {t['step']}: train loss {t['train']:.4f}, "
                       f"val loss {t['val']:.4f} (the seed: ≈1.45 / ≈1.58); curve: "
                       "[plots/char-training.png](plots/char-training.png) (`python benchmarks/training_plots.py`).")
        out += ["", "| row | code bits | CE (w) | ppl (w) | CE (w+emb) | ppl (w+emb) |", "|---|---:|---:|---:|---:|---:|"]
        names = dict.fromkeys(k.split("|")[0] for k in runs if "eps=" not in k)
        for row in names:
            w, we = runs.get(f"{row}|w"), runs.get(f"{row}|w+emb")
            cells = [f"{r['ce']:.4f} | {r['ppl']:.2f}" if r else "not measured | –" for r in (w, we)]
            label = {"float": "float", "int": "int {}", "seed": "PoT {} (seed bits)",
                     "twostep": "potq two-step {}"}[row.split(":")[0]]
            out.append(f"| {label.format(row.partition(':')[2])} | {stored_bits(row)} | {cells[0]} | {cells[1]} |")
        if not any(k.startswith("twostep:") for k in runs) and (RESULTS / f"main-{any_run['dataset']}.md").exists():
            out += ["", f"No two-step rows in this table (run with `--twostep` and no rows: a two-step run of this "
                        f"model is long on these machines, see [quantize-time.md](quantize-time.md)); potq's "
                        f"two-step PoT on the full test set is in "
                        f"[main-{any_run['dataset']}.md](main-{any_run['dataset']}.md)."]
        eps_rows = {k: v for k, v in runs.items() if "eps=" in k}
        if eps_rows:
            out += ["", "Epsilon sweep, PoT 4 (seed bits), w+emb:", "", "| ε | CE | ppl |", "|---:|---:|---:|"]
            out += [f"| {k.split('eps=')[1]} | {v['ce']:.4f} | {v['ppl']:.2f} |" for k, v in eps_rows.items()]
        out += ["", "Greedy samples (w+emb; float: the float model):", ""]
        for row in names:
            r = runs.get(f"{row}|w+emb") or runs.get(f"{row}|w")
            if r:
                text = (r["prompt"] + r["sample"]).replace("\n", " ⏎ ")
                out.append(f"- **{row}**: {text}")
        out.append("")
    write_text_atomic(MD, "\n".join(out))
    print(f"-> {MD}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    result_store.eval_arguments(p)
    p.add_argument("--twostep", nargs="*", default=["twostep:pot:3", "twostep:pot:2"],
                   help="potq two-step rows FMT:BITS via `potq quantize` (default pot 3 and 2 bits)")
    p.add_argument("--group-size", type=int, default=32, help="group size of the two-step rows")
    result_store.measure_or_rebuild(p, run, write_markdown)


if __name__ == "__main__":
    main()
