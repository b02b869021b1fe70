"""Benchmark 4: the peer — llama.cpp (through ``llama-cpp-python``) on the same CPU and model.

The shared SmolLM2-135M GGUF (Q4_1) is requantized by llama.cpp's own quantizer to Q4_0, Q3_K_M
and Q2_K (once, under ``$POTQ_HOME/bench/``); each is timed like potq's decoding benchmark: the
same prompt, the same number of greedy tokens, the same threads, in the same rounds as potq's
variants (the median of three). ``llama-cpp-python`` is the
benchmark-only extra ``potq[peer]``; without it this table is skipped with a note.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from potq.bench.decode import PREFILL_TOKENS, prompt_text
from potq.errors import PotqError
from potq.paths import home_dir

TYPES = {"Q4_0": 2, "Q3_K_M": 12, "Q2_K": 10}  # llama.cpp's LLAMA_FTYPE_MOSTLY_* numbers


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def requantized_path(source: Path, kind: str, folder: Path | None = None) -> Path:
    """Where :func:`requantized` keeps ``source`` requantized to ``kind`` (default folder
    ``$POTQ_HOME/bench``)."""
    return (folder or home_dir() / "bench") / f"{source.stem.split('.')[0]}.{kind}.gguf"


def requantized(source: Path, kind: str, folder: Path | None = None) -> Path:
    """``source`` requantized to ``kind`` by llama.cpp, made once (:func:`requantized_path`)."""
    import llama_cpp

    out = requantized_path(source, kind, folder)
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = TYPES[kind]
        params.allow_requantize = True
        tmp = out.with_suffix(".tmp")
        with _quiet_stderr():  # llama.cpp logs every tensor
            failed = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params) != 0
        if failed:
            raise RuntimeError(f"llama.cpp could not quantize {source} to {kind}")
        tmp.rename(out)
    return out


def block_bits_per_weight(path: Path) -> float:
    """Stored bits per weight of a GGUF's transformer-block matrices (``blk.*``, 2-D), scales
    included — the quantity potq's tables report for its quantized linears. (llama.cpp also
    quantizes the token embedding and output head, which this leaves out, as potq's rows keep
    them float.)"""
    from gguf import GGUFReader

    tensors = [t for t in GGUFReader(str(path)).tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    return 8 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (C libraries write there directly, past Python's sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def measure(path: Path, prompt_tokens: int, new_tokens: int, threads: int) -> dict:
    import llama_cpp

    with _quiet_stderr():
        llm = llama_cpp.Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads,
                              n_ctx=max(prompt_tokens + new_tokens, PREFILL_TOKENS) + 8, n_batch=PREFILL_TOKENS,
                              verbose=False)
    long_prompt = llm.tokenize(prompt_text(PREFILL_TOKENS).encode(), add_bos=False)[:PREFILL_TOKENS]
    prefill = []
    for _ in range(3):  # the prompt alone, as potq's prefill_speed times it
        llm.reset()
        start = time.perf_counter()
        llm.eval(long_prompt)
        prefill.append(time.perf_counter() - start)
    ids = llm.tokenize(prompt_text(prompt_tokens).encode(), add_bos=False)[:prompt_tokens]
    llm.reset()  # else generate() reuses the long prompt's cache for the shared start of the text
    start = time.perf_counter()
    steps = llm.generate(ids, temp=0.0, reset=True)
    next(steps)
    prompt_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens):
        next(steps)
    decode_s = time.perf_counter() - start
    return {"prompt_ms": prompt_s * 1e3, "tokens_per_s": new_tokens / decode_s, "file_mib": path.stat().st_size / 2**20,
            "prefill_tokens_per_s": len(long_prompt) / sorted(prefill)[1]}


def files(source: Path) -> dict[str, Path]:
    """The peer's files: the shipped GGUF and llama.cpp's requantizations of it (made once)."""
    return {"Q4_1 (shipped)": source, **{kind: requantized(source, kind) for kind in TYPES}}


def measured(path: Path, prompt_tokens: int, new_tokens: int, threads: int) -> dict:
    """:func:`measure` in a fresh process with the user's environment — not the OpenMP wait policy
    potq may have chosen for itself — so llama.cpp runs as it would on its own."""
    import json
    import subprocess

    from potq.threads import user_environment

    out = subprocess.run([sys.executable, "-W", "ignore::RuntimeWarning:runpy", "-m", "potq.bench.peer", str(path),
                          str(prompt_tokens), str(new_tokens), str(threads)],
                         capture_output=True, text=True, env=user_environment(), check=False)
    if out.returncode < 0:
        raise PotqError(f"llama.cpp crashed on {path.name} ({signal.Signals(-out.returncode).name}){_amx_hint()}; "
                        "`potq bench --no-peer` measures potq alone")
    if out.returncode != 0:
        raise PotqError(f"llama.cpp on {path.name} failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def check(peers: dict[str, Path], threads: int) -> None:
    """Run llama.cpp once on each file, briefly, before the long benchmark: a build that crashes on
    this CPU stops the run at its start, not after the twenty minutes of potq's own tables."""
    for path in peers.values():
        measured(path, 8, 2, threads)


def features() -> str:
    """The CPU features this llama.cpp build uses (``llama_print_system_info``, those set only): the
    report names them, since a build without one (AMX, say) is a different peer."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode()
    return ", ".join(f.split("=")[0].strip() for f in info.split(":", 1)[-1].split("|") if f.strip().endswith("= 1"))


def build() -> str:
    """The report's line on the peer: its build's CPU features, and whether it left out this CPU's AMX."""
    used = features()
    if cpu_has_amx() and "AMX" not in used:
        return used + " (this CPU's AMX left out: its llama.cpp path crashes on some machines, ggml-org/llama.cpp#20824)"
    return used


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX's int8 tiles (Linux /proc/cpuinfo; False where it cannot be read)."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "") \
        if cpuinfo.is_file() else ""
    return "amx_int8" in flags.split()


def _amx_hint() -> str:
    """llama.cpp built with -march=native on a CPU with AMX takes its AMX matrix path for prompts,
    which crashes on some machines (ggml-org/llama.cpp#20824); building without AMX avoids it."""
    try:
        built_with_amx = "AMX" in features()
    except ImportError:  # the crash came from a llama.cpp this process cannot load: say what may apply
        built_with_amx = True
    if not (cpu_has_amx() and built_with_amx):
        return ""
    return (": this CPU has AMX, whose llama.cpp path crashes on some machines; rebuild it without: "
            "CMAKE_ARGS=\"-DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' "
            "-DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'\" "
            "pip install --force-reinstall --no-deps --no-cache-dir llama-cpp-python==0.3.36")


def markdown(results: dict[str, dict], reference: dict[str, dict]) -> list[str]:
    """The peer's rows, with potq's pot3 decoding speed relative to each."""
    pot3 = reference.get("pot3", {}).get("tokens_per_s")
    prefill = reference.get("pot3", {}).get("prefill_tokens_per_s")
    lines = [f"| llama.cpp | file (MiB) | decoding tok/s | prompt (ms) | prefill of {PREFILL_TOKENS} (tok/s) "
             "| potq pot3 / this, decoding | potq pot3 / this, prefill |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        ratio = f"{pot3 / r['tokens_per_s']:.2f}×" if pot3 else "–"
        fill = f"{prefill / r['prefill_tokens_per_s']:.2f}×" if prefill else "–"
        lines.append(f"| {name} | {r['file_mib']:.1f} | {r['tokens_per_s']:.2f} | {r['prompt_ms']:.0f} "
                     f"| {r['prefill_tokens_per_s']:.0f} | {ratio} | {fill} |")
    return lines

if __name__ == "__main__":
    import json

    path, prompt, new, count = sys.argv[1:5]
    print(json.dumps(measure(Path(path), int(prompt), int(new), int(count))))
