"""PoT-QAT vs post-training PoT (the PoT-QAT seed): perplexity, improvement %, ROUGE-L and
BERTScore of greedy generations against the float model's, memory, samples.

    python benchmarks/qat_results.py --model nanogpt-shakespeare --bits 4 3 2 --group-size 32 --steps 1000 --lr 5e-4
    python benchmarks/qat_results.py --model smollm2-135m --bits 3 2 --steps 100 --max-windows 20

Per bit width: PoT round-to-nearest (the plain post-training baseline), PoT grid (Step 1, where
QAT's scales start) and PoT-QAT (learned scales). Every quantized model is saved as a potq folder
under out/qat/ and reloaded from disk before it is scored. QAT trains on the model's own training
text (C4's calibration half, or the char model's train split), never on the evaluation text.
Measurements are kept in docs/results/qat-MODEL.json (resumable per row) and docs/results/qat.md
is rebuilt from every stored model.
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
from potq.eval.similarity import ENCODER, bert_score, rouge_l
from potq.info import summary
from potq.paths import write_text_atomic

RESULTS, WORK = Path("docs/results"), Path("out/qat")
PROMPTS = {
    "shakespeare": ["ROMEO:\n", "JULIET:\n", "First Citizen:\n", "KING HENRY VI:\n", "MENENIUS:\nWhat"],
    "wikitext2": ["The history of the city", "In 1998, the band", "The game was released",
                  "Scientists have found that", "The river flows through"],
}


def generations(model: torch.nn.Module, lm: potq.LoadedModel, prompts: list[str], tokens: int) -> list[str]:
    return [generate(model, lm.tokenizer, p, max_new_tokens=tokens) for p in prompts]


def float_bytes(model: torch.nn.Module) -> int:
    """Bytes of the float model's tensors, a tied tensor counted once (what a float save stores)."""
    seen = {t.untyped_storage().data_ptr(): t.numel() * 4 for t in model.state_dict().values()}
    return sum(seen.values())


def measure(lm, row: str, bits: int, args, prompts, reference) -> dict:
    """Quantize one row, save, reload, score; ``reference`` are the float model's generations."""
    folder = WORK / f"{Path(args.model).name}-{row}{bits}"
    config = potq.QuantConfig("pot", bits, args.group_size)
    start = time.perf_counter()
    work = potq.LoadedModel(copy.deepcopy(lm.model), lm.tokenizer, lm.source)
    settings = {}
    if row == "qat":
        settings = {"steps": args.steps, "lr": args.lr, "batch_size": args.batch_size, "scales": "learned",
                    "calib_samples": args.pool, "calib_len": min(args.seq_len, max_positions(lm.model) or args.seq_len)}
    potq.quantize_(work, config, method=row, **settings)
    seconds = time.perf_counter() - start
    potq.save(work, folder, overwrite=True)
    model = potq.load(folder).model
    r = perplexity(model, lm.tokenizer, args.dataset, ctx=args.ctx, max_windows=args.max_windows, dtype="fp32",
                   progress=False)
    texts = generations(model, lm, prompts, args.sample_tokens)
    s = summary(folder)
    bert = bert_score(texts, reference)
    training = getattr(work.model, "potq_report", {}).get("training")
    return {"ce": r.nll, "ppl": r.ppl, "windows": r.windows, "total_windows": r.total_windows, "ctx": r.ctx,
            "dataset": args.dataset, "seconds": round(seconds, 1), "rouge_l": rouge_l(texts, reference),
            "bertscore_f1": bert.f1, "samples": texts, "file_bytes": s["file_bytes"],
            "quantized_bytes": s["quantized_bytes"], "quantized_weights": s["quantized_weights"],
            "bits_per_weight": s["bits_per_quantized_weight"], "settings": settings,
            "training": None if training is None else {k: training.get(k) for k in ("seconds", "tokens", "history",
                                                                                  "kept_step")}}


def run(args) -> None:
    name = Path(args.model).name
    store_path = RESULTS / f"qat-{name}.json"
    store = result_store.load(store_path)
    lm = potq.load_model(args.model)
    args.dataset = args.dataset or home_dataset(lm.source)
    args.ctx = args.ctx or min(2048, max_positions(lm.model) or 2048)
    prompts = PROMPTS[args.dataset]
    room = (max_positions(lm.model) or 10**6) - max(len(lm.tokenizer.encode(p)) for p in prompts)
    args.sample_tokens = min(args.sample_tokens, room)
    if "float" not in store["runs"] or store["runs"]["float"]["windows"] != (args.max_windows or
                                                                            store["runs"]["float"]["total_windows"]):
        r = perplexity(lm.model, lm.tokenizer, args.dataset, ctx=args.ctx, max_windows=args.max_windows,
                       dtype="fp32", progress=False)
        store["runs"]["float"] = {"ce": r.nll, "ppl": r.ppl, "windows": r.windows, "total_windows": r.total_windows,
                                  "ctx": r.ctx, "dataset": args.dataset, "bytes": float_bytes(lm.model),
                                  "samples": generations(lm.model, lm, prompts, args.sample_tokens)}
    reference = store["runs"]["float"]["samples"]
    for bits in args.bits:
        for row in ("rtn", "grid", "qat"):
            key = f"{row}:{bits}"
            if key in store["runs"] and store["runs"][key]["windows"] == store["runs"]["float"]["windows"]:
                continue
            print(f"{name} {key} ...", flush=True)
            store["runs"][key] = measure(lm, row, bits, args, prompts, reference)
            print(f"  ppl {store['runs'][key]['ppl']:.3f}", flush=True)
            store.update(group_size=args.group_size, torch_threads=torch.get_num_threads(), encoder=ENCODER,
                         prompts=prompts)
            result_store.save(store_path, store)
    write_markdown()


def write_markdown() -> None:
    out = ["# PoT-QAT vs post-training PoT", "",
           "Zero-excluded PoT weights (`--format pot`). *rtn*: round to nearest; *grid*: Step 1 scales (QAT's",
           "start); *qat*: `potq qat` with learned scales. Improvement = perplexity drop of QAT relative to",
           "rtn (the PoT-QAT seed's metric). ROUGE-L and BERTScore compare each row's greedy continuations of",
           "the prompts with the float model's. Memory: the packed linear weights incl. scales vs their float32",
           "size (the seed's 87.5 % at 4 bits ignores scales), and the whole file vs the float model.", "",
           "QAT's held-out loss during training (`python benchmarks/training_plots.py`):", "",
           "![QAT loss](plots/qat-loss.png)", ""]
    for model, store in result_store.stored(RESULTS, "qat"):
        runs, f = store["runs"], store["runs"]["float"]
        out += [f"## {model}", "", f"`{store['command']}`", "",
                f"{f['dataset']}, ctx {f['ctx']}, {f['windows']} of {f['total_windows']} windows; group size "
                f"{store['group_size']}; {store['torch_threads']} threads; BERTScore encoder: {store['encoder']}.", "",
                "| row | bits/w | CE | ppl | improvement | ROUGE-L | BERTScore F1 | linears saved | file saved | QAT |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
                f"| float | 32 | {f['ce']:.4f} | {f['ppl']:.3f} | | 1.000 | 1.000 | | | |"]
        for key, r in runs.items():
            if key == "float":
                continue
            row, bits = key.split(":")
            base = runs.get(f"rtn:{bits}")
            gain = f"{100 * (base['ppl'] - r['ppl']) / base['ppl']:+.2f} %" if row == "qat" and base else ""
            saved = 100 * (1 - r["quantized_bytes"] / (4 * r["quantized_weights"]))
            file_saved = 100 * (1 - r["file_bytes"] / f["bytes"])
            t = r.get("training")
            qat = f"{r['settings']['steps']} steps, {t['tokens']:,} tokens, {t['seconds']:.0f} s" if t else ""
            if t and t.get("kept_step") is not None:
                qat += f"; kept step {t['kept_step']} (best held-out loss)"
            out.append(f"| {row} {bits}-bit | {r['bits_per_weight']:.3f} | {r['ce']:.4f} | {r['ppl']:.3f} | {gain} | "
                       f"{r['rouge_l']:.3f} | {r['bertscore_f1']:.3f} | {saved:.1f} % | {file_saved:.1f} % | {qat} |")
        out += ["", "First prompt, greedy:", ""]
        for key, r in runs.items():
            out.append(f"- **{key}**: " + (store["prompts"][0] + r["samples"][0]).replace("\n", " ⏎ "))
        out.append("")
    write_text_atomic(RESULTS / "qat.md", "\n".join(out))
    print(f"-> {RESULTS / 'qat.md'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    result_store.eval_arguments(p)
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--pool", type=int, default=512, help="training windows drawn from the training text")
    p.add_argument("--seq-len", type=int, default=256)
    result_store.measure_or_rebuild(p, run, write_markdown)


if __name__ == "__main__":
    main()
