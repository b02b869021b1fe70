"""Peak memory of a streamed quantization: random-init models with Llama-2-7B's and TinyLlama-1.1B's shapes.

    .venv/bin/python benchmarks/streaming.py             # -> docs/results/streaming.md

Writes (once, under out/streaming/) Hugging Face folders of bf16 safetensors shards with
Llama-2-7B's shapes (32 blocks, d 4096, ffn 11008, vocab 32000) and TinyLlama-1.1B's (22 blocks,
d 2048, ffn 5632, 4 KV heads) — random weights: memory and time do not depend on the values —
then runs `potq quantize` in a fresh process each: rtn and grid (data-free, streamed tensor by
tensor) on the 7B-shaped one, twostep and gptq (block-wise, each block read in its turn) with a
small calibration set on the 1B-shaped one; and records each run's peak resident memory (the
kernel's max RSS of the process, from GNU time) and time per block.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "out" / "streaming"
SHAPES = {"Llama-2-7B": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
          "TinyLlama-1.1B": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)}
FOLDERS = {"Llama-2-7B": "llama2-7b-shaped", "TinyLlama-1.1B": "tinyllama-1b-shaped"}
# (row, model, method, extra flags): data-free methods on the 7B shapes, block-wise ones on the 1B shapes
RUNS = [("rtn", "Llama-2-7B", "rtn", []), ("grid", "Llama-2-7B", "grid", []),
        ("twostep (1B-shaped)", "TinyLlama-1.1B", "twostep", ["--calib-samples", "8", "--calib-len", "256",
                                                                "--epochs", "2"]),
        ("gptq (1B-shaped)", "TinyLlama-1.1B", "gptq", ["--calib-samples", "8", "--calib-len", "256"])]


def make_model(folder: Path, shapes: dict) -> None:
    """A folder of these shapes, one shard per block (each shard written and freed on its own)."""
    from transformers import LlamaConfig

    if (folder / "done").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    LlamaConfig(**shapes, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False).save_pretrained(folder)
    d, f, v = shapes["hidden_size"], shapes["intermediate_size"], shapes["vocab_size"]
    kv = d * shapes["num_key_value_heads"] // shapes["num_attention_heads"]
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    save_file({"model.embed_tokens.weight": rand(v, d), "model.norm.weight": torch.ones(d, dtype=torch.bfloat16),
               "lm_head.weight": rand(v, d)}, str(folder / "model-00000.safetensors"))
    for i in range(shapes["num_hidden_layers"]):
        p = f"model.layers.{i}."
        block = {p + "input_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
                 p + "post_attention_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
                 **{p + f"self_attn.{n}.weight": rand(d, d) for n in ("q_proj", "o_proj")},
                 **{p + f"self_attn.{n}.weight": rand(kv, d) for n in ("k_proj", "v_proj")},
                 p + "mlp.gate_proj.weight": rand(f, d), p + "mlp.up_proj.weight": rand(f, d),
                 p + "mlp.down_proj.weight": rand(d, f)}
        save_file(block, str(folder / f"model-{i + 1:05d}.safetensors"))
        print(f"  shard {i + 1}/{shapes['num_hidden_layers']}", flush=True)
    _write_tokenizer(folder)
    (folder / "done").write_text("")


def _write_tokenizer(folder: Path) -> None:
    """A tokenizer of at most the model's vocabulary: SmolLM2's would be too large, stories260K's fits."""
    import potq

    potq.load_model("stories260k").tokenizer.backend.save(str(folder / "tokenizer.json"))


def run(row: str, model: str, method: str, flags: list[str]) -> dict:
    """One streamed quantization in a fresh process; its own peak RSS from GNU time."""
    out = WORK / f"packed-{method}"
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "POTQ_MAXRSS_KIB %M", sys.executable, "-m", "potq.cli", "quantize",
                           str(WORK / FOLDERS[model]), "--format", "pot", "--bits", "3", "--method", method, *flags,
                           "-o", str(out), "--overwrite", "--quiet", "--json"], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-1000:])
    seconds = time.perf_counter() - start
    peak_kib = int(proc.stderr.rsplit("POTQ_MAXRSS_KIB", 1)[1].split()[0])
    result = json.loads(proc.stdout)
    return {"method": row, "model": model, "flags": " ".join(flags), "seconds": seconds,
            "per_block_s": result["seconds"] / SHAPES[model]["num_hidden_layers"],
            "peak_rss_gib": peak_kib / 2**20, "packed_gib": result["file_bytes"] / 2**30}


def evaluate(packed: Path) -> dict:
    """Perplexity on two short windows of the packed 7B-shaped model: its peak RSS against the
    packed file's size (the float layers are never materialised)."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "POTQ_MAXRSS_KIB %M", sys.executable, "-m", "potq.cli", "eval",
                           str(packed), "--dataset", "wikitext2", "--ctx", "128", "--max-windows", "2", "--quiet",
                           "--json"], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-1000:])
    peak_kib = int(proc.stderr.rsplit("POTQ_MAXRSS_KIB", 1)[1].split()[0])
    return {"method": "eval (packed rtn)", "seconds": time.perf_counter() - start, "per_block_s": None,
            "peak_rss_gib": peak_kib / 2**20, "packed_gib": (packed / "model.safetensors").stat().st_size / 2**30}


def main() -> None:
    store = ROOT / "docs" / "results" / "streaming.json"
    done = {r["method"]: r for r in json.loads(store.read_text())} if store.is_file() else {}
    steps = len(SHAPES) + len(RUNS) + 1
    for i, (model, shapes) in enumerate(SHAPES.items(), 1):
        print(f"[{i}/{steps}] writing the {model}-shaped bf16 model (once)", flush=True)
        make_model(WORK / FOLDERS[model], shapes)
    for i, (row, model, method, flags) in enumerate(RUNS, len(SHAPES) + 1):
        if row not in done:
            print(f"[{i}/{steps}] potq quantize {FOLDERS[model]} --method {method} (streamed)", flush=True)
            done[row] = run(row, model, method, flags)
            store.write_text(json.dumps(list(done.values()), indent=1) + "\n")
    if "eval (packed rtn)" not in done:
        print(f"[{steps}/{steps}] potq eval of the packed model (2 windows)", flush=True)
        done["eval (packed rtn)"] = evaluate(WORK / "packed-rtn")
        store.write_text(json.dumps(list(done.values()), indent=1) + "\n")
    sizes = {m: sum(p.stat().st_size for p in (WORK / FOLDERS[m]).glob("*.safetensors")) / 2**30 for m in SHAPES}
    lines = ["# Streaming: a model larger than memory", "", "`.venv/bin/python benchmarks/streaming.py`", "",
             "Random-init models with the shapes of " + " and ".join(
                 f"{m} ({sizes[m]:.1f} GiB of bf16 safetensors shards; {2 * sizes[m]:.1f} GiB in float32)"
                 for m in SHAPES) + ", quantized to 3-bit PoT (G128) by `potq quantize`, then evaluated, on "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, 24 GiB of memory.", "",
             "| step | model shapes | flags | peak RSS (GiB) | time (min) | per block (s) | packed file (GiB) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in done.values():
        per_block = "–" if r["per_block_s"] is None else f"{r['per_block_s']:.1f}"
        lines.append(f"| {r['method']} | {r.get('model', 'Llama-2-7B')} | {r.get('flags') or '–'} | "
                     f"{r['peak_rss_gib']:.2f} | {r['seconds'] / 60:.1f} | {per_block} | {r['packed_gib']:.2f} |")
    lines += ["", "Note: peak RSS is each command's maximum resident set (GNU time), in a fresh process; the "
              "packed file keeps the embedding and head in bf16, as the source has them. The run's own "
              "`--json` gives the quantize time; eval reads two windows of 128 tokens. rtn and grid stream "
              "tensor by tensor (potq/stream.py); twostep and gptq read each block from the shards in its turn "
              "(`load_model(lazy=True)`), with the flags shown. Times are wall times on a shared machine (other "
              "work running beside a run lengthens it); peak memory does not depend on that."]
    (ROOT / "docs" / "results" / "streaming.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
