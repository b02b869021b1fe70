"""Benchmark 3: end-to-end decoding — tokens/s and peak memory, float vs packed PoT.

Each variant runs in a fresh process (``python -m potq.bench.decode FOLDER``), so its peak
resident memory is its own: the model as it is loaded (float, or potq's packed folder with the
fused kernel), a prompt of ``prompt_tokens`` tokens of WikiText-2, then ``new_tokens`` greedy
steps with the KV cache, batch 1, through the path ``potq generate`` takes (for Llama-family models
potq's native decoder, the same for the float and the packed model), and a 512-token prompt's
prefill. The packed folders are made once by RTN (the method does not change the speed) under
``$POTQ_HOME/bench/``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import potq
from potq.bench.bandwidth import weight_bytes_per_token
from potq.eval.data import eval_text
from potq.eval.generate import next_tokens
from potq.kernels import fused
from potq.models import native_decoder
from potq.models.llama_decoder import LlamaDecoder, supports
from potq.nn import QuantLinear
from potq.errors import PotqError
from potq.paths import home_dir
from potq.storage import read_manifest

# variant -> (format, bits, quantize embeddings too); None = the float model. APoT runs on PoT's
# 8-bit-activation kernels with its magnitudes as their byte table: timed to show it costs the same.
VARIANTS: dict[str, tuple[str, int, bool] | None] = {
    "float32": None, "pot4": ("pot", 4, False), "pot3": ("pot", 3, False), "pot2": ("pot", 2, False),
    "pot3 + embeddings": ("pot", 3, True), "apot4": ("apot", 4, False), "apot3": ("apot", 3, False),
    "apot2": ("apot", 2, False)}
# the ablation of an 8-bit table: pot3 with the token table (and tied head) held in float32 again
FLOAT_TABLES = "pot3, float32 table"


def variant_folder(model: str, variant: str, cache: Path, group: int = 128) -> str:
    """The model to load for ``variant``: the float model itself, or a packed folder made once in ``cache``."""
    spec = ("pot", 3, False) if variant == FLOAT_TABLES else VARIANTS[variant]
    if spec is None:
        return model
    fmt, bits, embeddings = spec
    suffix = "-emb" if embeddings else "-float-table" if variant == FLOAT_TABLES else ""
    folder = cache / f"{Path(model).name}-{fmt}{bits}-g{group}{suffix}"
    if not _cached(folder):
        lm = potq.load_model(model)
        potq.quantize_(lm, potq.QuantConfig(fmt, bits, group), method="rtn", embeddings=embeddings, progress=False)
        if variant == FLOAT_TABLES:
            _float_tables_(lm.model)
        potq.save(lm, folder, overwrite=True)
    return str(folder)


def _float_tables_(model: torch.nn.Module) -> None:
    """Turn packed embedding tables (and a head tied to one) back into float32 layers of the same
    values: how potq held a GGUF's Q8_0 table before it kept such tables 8-bit."""
    from torch import nn

    from potq.nn import QuantEmbedding

    head, table = model.get_output_embeddings(), model.get_input_embeddings()
    tied = isinstance(head, QuantLinear) and isinstance(table, QuantEmbedding) and head.codes is table.codes
    for name, packed in [(n, m) for n, m in model.named_modules() if isinstance(m, QuantEmbedding)]:
        model.set_submodule(name, nn.Embedding.from_pretrained(packed.dequantize(), freeze=True))
    exact = isinstance(head, QuantLinear) and (head.fmt.name, head.fmt.bits) == ("uniform-sym", 8)
    if tied or exact:  # a head on the table's codes shares the float table; an untied 8-bit one gets its own
        linear = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)
        linear.weight = model.get_input_embeddings().weight if tied else nn.Parameter(head.dequantize())
        if head.bias is not None:
            linear.bias = nn.Parameter(head.bias.detach().clone())
        model.set_submodule(next(n for n, m in model.named_modules() if m is head), linear)


def measure(path: str, prompt_tokens: int, new_tokens: int, threads: int) -> dict:
    """Load ``path``, then time the prompt and the greedy steps (in this process)."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    lm = potq.load_model(path)
    if native_decoder.unsupported(lm.model) is None:  # its one-time description, as llama.cpp's load
        native_decoder.describe(lm.model)             # prepares its model: the prompt is the prompt alone
    load_s = time.perf_counter() - start
    rss_loaded = _status_mib("VmRSS")
    ids = lm.tokenizer.encode(prompt_text(prompt_tokens))[:prompt_tokens]
    prompt_s, decode_s, tokens = _greedy(lm.model, ids, new_tokens)
    peak = _status_mib("VmHWM")  # before the check below, whose PyTorch path decodes float weights
    packed = any(isinstance(m, QuantLinear) for m in lm.model.modules())
    same_text = None
    if packed:  # the same greedy tokens from the pure-PyTorch path
        with fused.enabled(False), native_decoder.enabled(False):
            same_text = _greedy(lm.model, ids, new_tokens)[2] == tokens
    read = weight_bytes_per_token(lm.model)
    native = native_decoder.unsupported(lm.model) is None
    breakdown = native_breakdown if native else step_breakdown if supports(lm.model) else None
    return {"load_s": load_s, "prompt_ms": prompt_s * 1e3, "tokens_per_s": new_tokens / decode_s,
            "prefill_tokens": PREFILL_TOKENS,
            "prefill_tokens_per_s": prefill_speed(lm.model, lm.tokenizer.encode(prompt_text(PREFILL_TOKENS))[:PREFILL_TOKENS]),
            "path": "native" if native else "python",
            "same_tokens_as_torch_path": same_text,
            "step_ms": breakdown(lm.model, ids) if breakdown else None,
            "rss_after_load_mib": rss_loaded, "peak_rss_mib": peak,
            "threads": threads, "weight_bytes_per_token": read["total"], "head_bytes": read["head"]}


def step_breakdown(model: torch.nn.Module, prompt: list[int], steps: int = 32, repeats: int = 5) -> dict[str, float]:
    """Where a decoding step's time goes, in milliseconds: a whole step (after ``prompt``), then
    the kinds of call in it timed alone (:meth:`LlamaDecoder.step_parts`); ``other`` is the rest —
    norms, the activation, residual adds, the embedding lookup, Python. Each figure is the median
    of ``repeats`` timings of ``steps`` calls."""
    decoder = LlamaDecoder(model, len(prompt) + steps * repeats + 1)

    def per_call(fn: Callable[[], object]) -> float:
        timings = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            timings.append((time.perf_counter() - start) / steps * 1e3)
        return sorted(timings)[repeats // 2]

    with torch.inference_mode():
        token = decoder(torch.tensor([prompt])).argmax().view(1, 1)
        parts = {"step": per_call(lambda: decoder(token))}
        decoder.length = len(prompt)
        parts.update({name: per_call(fn) for name, fn in decoder.step_parts().items()})
    parts["other"] = parts["step"] - sum(v for k, v in parts.items() if k != "step")
    return parts


def native_breakdown(model: torch.nn.Module, prompt: list[int], steps: int = 32, repeats: int = 5) -> dict[str, float]:
    """Where a native decoding step's time goes, in milliseconds: a whole step after ``prompt``
    (the median of ``repeats`` timings of ``steps`` steps, each at the same position), then the
    decoder's own clock over ``repeats`` × ``steps`` more steps, per phase and averaged over its
    threads (the layers' products, attention, the elementwise steps, waiting at barriers, the
    output head); ``outside`` is what the step's wall time holds beyond them (the call from
    Python, starting the thread team). The clock is read only in those steps, so ``step`` is
    the unprofiled time."""
    decoder = native_decoder.NativeDecoder(model, len(prompt) + 1)
    decoder(torch.tensor([prompt]))
    native, logits, at = decoder._decoder, torch.empty(model.lm_head.out_features), len(prompt)
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            native.feed([prompt[-1]], at, logits)
        timings.append((time.perf_counter() - start) / steps * 1e3)
    native.profile(True)
    for _ in range(repeats * steps):
        native.feed([prompt[-1]], at, logits)
    native.profile(False)
    parts = {name: ms / (repeats * steps) for name, ms in native.phase_ms().items()}
    step = sorted(timings)[repeats // 2]
    return {"step": step, **{name: parts[name] for name in PHASES}, "outside": step - sum(parts.values())}


# the native decoder's phases (Decoder.phase_ms), in the breakdown table's order
PHASES = ("projections", "attention", "elementwise", "waiting", "output head")


PREFILL_TOKENS = 512  # the runtime issue's prompt length


def prefill_speed(model: torch.nn.Module, prompt: list[int], repeats: int = 3) -> float:
    """Prompt tokens per second for ``prompt`` up to its first logits, through the decoder ``potq
    generate`` uses; the median of ``repeats`` (after a warm-up prompt, so that no run pays for
    describing the model to the native decoder)."""
    timings = []
    with torch.inference_mode():
        next(next_tokens(model, prompt[:8], 1, lambda logits: 0))
        for _ in range(repeats):
            start = time.perf_counter()
            next(next_tokens(model, prompt, 1, lambda logits: 0))
            timings.append(time.perf_counter() - start)
    return len(prompt) / sorted(timings)[repeats // 2]


def prompt_text(tokens: int) -> str:
    """The start of WikiText-2's test text, ample for ``tokens`` tokens (not the whole text: encoding
    all of it would dominate the peak memory being measured)."""
    return eval_text("wikitext2")[: 16 * tokens]


def _cached(folder: Path) -> bool:
    """Whether ``folder`` holds a packed model this potq reads (an older file format is made again)."""
    try:
        return bool(read_manifest(folder))
    except PotqError:
        return False


def _greedy(model: torch.nn.Module, prompt: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
    """Seconds for the prompt (to the first token), seconds for ``new_tokens`` more greedy steps,
    and the tokens — through the path ``potq generate`` takes (:func:`potq.eval.generate.next_tokens`)."""
    with torch.inference_mode():
        start = time.perf_counter()
        steps = next_tokens(model, prompt, new_tokens + 1, lambda logits: int(logits.argmax()))
        tokens = [next(steps)]
        prompt_s = time.perf_counter() - start
        start = time.perf_counter()
        tokens += list(steps)
        decode_s = time.perf_counter() - start
    return prompt_s, decode_s, tokens


def _status_mib(field: str) -> float:
    """This process's resident memory now (``VmRSS``) or at its peak (``VmHWM``: unlike getrusage's
    maxrss, it starts afresh in a new program, not at the forking parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(model: str, prompt_tokens: int = 64, new_tokens: int = 128, threads: int = 2,
        variants: list[str] | None = None, cache: Path | None = None, rounds: int = 3,
        peers: dict[str, Path] | None = None, folders: dict[str, str] | None = None) -> dict[str, dict]:
    """Every variant in its own process, ``rounds`` times in turn; per variant the run with the
    median tokens/s (with every round's tokens/s under ``rounds_tokens_per_s``). A shared machine's
    speed drifts from minute to minute: alternating the variants and taking the median keeps one
    slow minute from deciding a ratio. ``folders`` names a packed folder for a variant that is not
    one of :data:`VARIANTS`. ``peers`` (name -> GGUF) are llama.cpp's files, timed in
    the same rounds (:func:`potq.bench.peer.measured`) so that a ratio to them is as fair. Packed
    folders are kept in ``cache`` (default ``$POTQ_HOME/bench``) for the next run."""
    from potq.bench import peer

    names = variants or list(VARIANTS)
    folders = {name: (folders or {}).get(name) or variant_folder(model, name, cache or home_dir() / "bench")
               for name in names}
    runs: dict[str, list[dict]] = {name: [] for name in [*names, *(peers or {})]}
    for _ in range(rounds):
        for name in names:
            out = subprocess.run([sys.executable, "-m", "potq.bench.decode", folders[name], "--prompt-tokens",
                                  str(prompt_tokens), "--new-tokens", str(new_tokens), "--threads", str(threads)],
                                 capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise potq.PotqError(f"the decoding benchmark of {name} failed: {out.stderr.strip().splitlines()[-1]}")
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
        for name, path in (peers or {}).items():
            runs[name].append(peer.measured(path, prompt_tokens, new_tokens, threads))
    results = {}
    for name, measured in runs.items():
        ranked = sorted(measured, key=lambda r: r["tokens_per_s"])
        results[name] = {**ranked[len(ranked) // 2], "rounds_tokens_per_s": [r["tokens_per_s"] for r in measured]}
    return results


def markdown(results: dict[str, dict], prompt_tokens: int, new_tokens: int, read_gb_s: float) -> list[str]:
    """The decoding table, with the bandwidth bound (benchmark 5) beside each measured speed."""
    base = results.get("float32", {}).get("tokens_per_s")
    first = next(iter(results.values()))
    lines = [f"Prompt {prompt_tokens} tokens, {new_tokens} greedy tokens with the KV cache, batch 1, "
             f"{first['threads']} threads; each variant in a fresh process, the variants in turn "
             f"{len(first.get('rounds_tokens_per_s', [0]))} times, the median run shown. Bound = "
             f"measured read bandwidth {read_gb_s:.1f} GB/s ÷ weight bytes read per token. Prompt: the "
             f"first token's latency after the load (which prepares the native decoder once, as llama.cpp's "
             f"load prepares its model).", "",
             "| model | decoding tok/s | vs float32 | weights read per token (MB) | bound (tok/s) | of bound "
             f"| prompt (ms) | prefill of {PREFILL_TOKENS} (tok/s) | RSS after load (MiB) | peak RSS (MiB) "
             "| greedy tokens = PyTorch path |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in results.items():
        ratio = f"{r['tokens_per_s'] / base:.2f}×" if base else "–"
        mb = r["weight_bytes_per_token"] / 1e6
        bound = read_gb_s * 1e3 / mb
        lines.append(f"| {name} | {r['tokens_per_s']:.2f} | {ratio} | {mb:.1f} | {bound:.1f} | "
                     f"{r['tokens_per_s'] / bound:.0%} | {r['prompt_ms']:.0f} | {r['prefill_tokens_per_s']:.0f} | "
                     f"{r['rss_after_load_mib']:.0f} | "
                     f"{r['peak_rss_mib']:.0f} | {_same(r['same_tokens_as_torch_path'])} |")
    return lines


def breakdown_markdown(results: dict[str, dict]) -> list[str]:
    """The step breakdown table (:func:`native_breakdown`, or :func:`step_breakdown` for a model
    off the native path), with the rate at which the layers' products read the blocks' weights."""
    rows = {name: r for name, r in results.items() if r.get("step_ms")}
    if not rows:
        return []
    parts = list(dict.fromkeys(k for r in rows.values() for k in r["step_ms"] if k != "step"))
    lines = ["Where a decoding step's time goes (ms per token, in the same processes): the native decoder's "
             "step (wall time), then its own clock per phase, the mean over its threads — the layers' "
             "products, attention (rotary embedding and KV cache included), the elementwise steps (norms, the "
             "activations' 8-bit rounding, the gated activation, residual adds), waiting for the other "
             "thread at barriers, the output head; 'outside': the call from Python and starting the threads. "
             "'products read': the blocks' weight bytes ÷ the products' time.", "",
             "| model | step | " + " | ".join(parts) + " | products read (GB/s) |",
             "|---|" + "---:|" * (len(parts) + 2)]
    for name, r in rows.items():
        p = r["step_ms"]
        rate = ((r["weight_bytes_per_token"] - r["head_bytes"]) / p["projections"] / 1e6
                if p.get("projections") else None)
        lines.append(f"| {name} | {p['step']:.2f} | " + " | ".join(f"{p[k]:.2f}" if k in p else "–" for k in parts)
                     + (f" | {rate:.1f} |" if rate else " | – |"))
    return lines


def _same(flag: bool | None) -> str:
    return "–" if flag is None else ("yes" if flag else "**no**")


def main() -> None:
    p = argparse.ArgumentParser(description="time decoding of one model (a child of `potq bench`)")
    p.add_argument("model")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    print(json.dumps(measure(a.model, a.prompt_tokens, a.new_tokens, a.threads)))


if __name__ == "__main__":
    main()
