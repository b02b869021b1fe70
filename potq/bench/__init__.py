"""``potq bench``: how fast packed PoT really is on this CPU, against float and against llama.cpp.

Five tables (issue: "Make PoT fast"), each from one module: dequantization throughput
(:mod:`.dequant`), GEMV latency on every linear shape of the model (:mod:`.gemv`), end-to-end
decoding (:mod:`.decode`), the llama.cpp peer (:mod:`.peer`) and the memory-bandwidth bound
(:mod:`.bandwidth`). Every ratio is measured within one run; the Markdown report and the raw
numbers are written atomically next to each other, with the command that made them.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import torch

from potq.bench import bandwidth, decode, dequant, gemv, peer
from potq.bench.timing import cpu_name, last_level_cache_bytes
from potq.errors import PotqError
from potq.kernels import fused
from potq.paths import write_text_atomic

TARGETS = {"dequant": 1.5, "gemv": 4.0, "decode": 2.0, "peer": 1.5}
# the runtime issue's decoding targets: pot3 and pot4 tokens/s against llama.cpp Q4_0's, pot3 against its bound
RUNTIME = {"pot3": 1.3, "pot4": 1.1, "bound": 0.7, "prefill": 1.0}
NOISE = ("Each ratio below comes from one run, its variants measured in turn on the same machine. The "
         "absolute speed of this shared virtual machine drifts by tens of percent from hour to hour, so a "
         "ratio close to its target can land on the other side of it in another run.")


def _largest_linear(model: str) -> tuple[torch.Tensor, tuple[int, int]]:
    from potq.models import load_model

    lm = load_model(model)
    shape, names = next(iter(gemv.linear_shapes(lm.model).items()))
    return lm.model.get_submodule(names[0]).weight.detach().clone(), shape


def quick(model: str, threads: int) -> str:
    """The fused 3-bit GEMV against float32 on the model's largest linear shape (under a minute)."""
    torch.set_num_threads(threads)
    weight, shape = _largest_linear(model)
    fp32, pot3 = gemv.quick_speedup(weight)
    print(f"largest linear shape {shape[0]}×{shape[1]}, batch 1, {threads} threads, {fused.best_isa()} kernel: "
          f"fp32 {fp32:.1f} µs, fused pot3 {pot3:.1f} µs")
    return f"gemv pot3/fp32 speedup: {fp32 / pot3:.2f}×"


def vs_llamacpp(model: str, threads: int, prompt_tokens: int = 64, new_tokens: int = 128) -> str:
    """pot3's decoding speed against llama.cpp Q4_0's, measured in turn in one run (a few minutes);
    the last line says the ratio."""
    from potq.models.registry import resolve

    source = resolve(model)[1]
    if not peer.available() or source.suffix != ".gguf":
        raise PotqError("--vs-llamacpp needs llama-cpp-python (pip install -e '.[peer]') and a GGUF model")
    both = decode.run(model, prompt_tokens, new_tokens, threads, variants=["pot3"],
                      peers={"Q4_0": peer.requantized(source, "Q4_0")})
    ours, theirs = both["pot3"], both["Q4_0"]
    print(f"pot3 {ours['tokens_per_s']:.1f} tok/s, llama.cpp Q4_0 {theirs['tokens_per_s']:.1f} tok/s "
          f"({threads} threads, {new_tokens} greedy tokens after {prompt_tokens})")
    return f"decode pot3/llama.cpp Q4_0: {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}×"


def _verdict(measured: float, target: float, what: str) -> str:
    ok = measured >= target
    return (f"- {what}: **{measured:.2f}×** (target ≥ {target:g}×) — "
            + ("met" if ok else f"missed by {target / measured:.2f}×"))


def run_all(model: str, threads: int, out_md: Path, prompt_tokens: int = 64, new_tokens: int = 128,
            with_peer: bool = True) -> None:
    """All five benchmarks into one report, each table printed as it is measured; the report is
    written to ``out_md`` (Markdown, :func:`render`) and beside it as JSON."""
    from potq.models import load_model
    from potq.models.registry import resolve

    torch.set_num_threads(threads)
    report: dict = {"command": "potq " + " ".join(shlex.quote(a) for a in sys.argv[1:]), "model": model,
                    "threads": threads, "cpu": cpu_name(), "isa": fused.best_isa(), "q8_isa": fused.q8_isa(),
                    "torch": torch.__version__,
                    "prompt_tokens": prompt_tokens, "new_tokens": new_tokens}

    source = resolve(model)[1]
    peers = peer.files(source) if with_peer and peer.available() and source.suffix == ".gguf" else {}
    peer.check(peers, threads)

    print("1/5 dequantization ...", flush=True)
    report["dequant"] = dequant.run()
    _show(render(report))

    print("2/5 GEMV on every linear shape ...", flush=True)
    lm = load_model(model)
    shapes = gemv.linear_shapes(lm.model)
    weights = {s: lm.model.get_submodule(n[0]).weight.detach().clone() for s, n in shapes.items()}
    report["linear_layers"] = sum(len(n) for n in shapes.values())
    report["shape_layers"] = {str(s): n for s, n in shapes.items()}
    del lm
    report["gemv"] = {regime: {str(s): gemv.measure_shape(w, regime) for s, w in weights.items()}
                      for regime in ("hot", "decoding")}
    _show(render(report))

    print("3/5 + 4/5 + 5/5 end-to-end decoding" + (", llama.cpp in the same rounds" if peers else "")
          + " and the bandwidth bound ...", flush=True)
    report["read_gb_s"] = bandwidth.read_gb_s()
    report["llc_bytes"] = last_level_cache_bytes()
    timed = decode.run(model, prompt_tokens, new_tokens, threads, peers=peers)
    report["decode"] = {name: r for name, r in timed.items() if name not in peers}
    if peers:
        report["peer"] = {name: timed[name] for name in peers}
        report["peer_features"] = peer.build()
    report["complete"] = True
    _write(out_md, render(report), report)


def render(report: dict) -> list[str]:
    """The Markdown report of what ``report`` holds so far (all of it once ``complete``)."""
    md = ["# Speed: packed PoT on this CPU", "", f"`{report['command']}`", "",
          f"{report['cpu']}, {report['threads']} threads, fused kernel: {report['isa']}, native decoder's "
          f"8-bit-activation kernel: {report.get('q8_isa', '?')}, torch {report['torch']}; "
          f"model {report['model']}.", ""]
    if "dequant" in report:
        md += ["## 1. Dequantization throughput", ""] + dequant.markdown(report["dequant"], "4096×4096") + [""]
    if "gemv" in report:
        md += ["## 2. GEMV latency (batch 1)", "", gemv.__doc__.split("\n\n", 1)[1].strip()]
        if not any(gemv.Q8_COLUMN in r for r in report["gemv"]["hot"].values()):
            md += ["", "(This report was measured before the 8-bit-activation layer had its column.)"]
        md += gemv.markdown(report["gemv"], report["shape_layers"]) + [""]
    if "decode" in report:
        md += ["## 3. End-to-end decoding, and 5. the bandwidth bound", ""]
        md += decode.markdown(report["decode"], report["prompt_tokens"], report["new_tokens"], report["read_gb_s"])
        md += [""] + decode.breakdown_markdown(report["decode"]) + [""]
    if not report.get("complete"):
        return md
    md += ["## 4. Peer: llama.cpp on the same CPU", ""]
    if "peer" in report:
        md += [peer.__doc__.split("\n\n", 1)[1].strip().split("\n\n")[0], ""]
        if "peer_features" in report:
            md += [f"llama.cpp's build uses: {report['peer_features']}.", ""]
        md += peer.markdown(report["peer"], report["decode"]) + [""]
    else:
        md += ["Not measured in this run: install the extra `pip install -e .[peer]` (builds llama.cpp, "
               "about 15 minutes) and give a GGUF model.", ""]
    md += ["## Targets", "", NOISE, ""] + _verdicts(report) + [""]
    md += ["## Reading the numbers", ""] + _reading(report) + [""]
    return md


def rerender(out_md: Path) -> None:
    """Write ``out_md`` again from the JSON report beside it (after a change to the wording or the
    layout of the report; nothing is measured)."""
    source = out_md.with_suffix(".json")
    if not source.is_file():
        raise PotqError(f"{source} not found: run `potq bench` first")
    report = json.loads(source.read_text())
    _write(out_md, render(report), report)


def _verdicts(report: dict) -> list[str]:
    lines = []
    for r in report["dequant"]:
        if r["ratio"] is not None:
            lines.append(_verdict(r["ratio"], TARGETS["dequant"],
                                  f"PoT dequantization vs uniform, {r['dtype']} ({r['path']})"))
    for regime, by_shape in report["gemv"].items():
        shape, r = next(iter(by_shape.items()))
        lines.append(_verdict(r["fp32"] / r["pot3"], TARGETS["gemv"],
                              f"fused pot3 GEMV vs fp32 on the largest shape {shape}, {regime}"))
    dec = report["decode"]
    lines.append(_verdict(dec["pot3"]["tokens_per_s"] / dec["float32"]["tokens_per_s"], TARGETS["decode"],
                          "pot3 decoding vs float32 tokens/s"))
    bound = report["read_gb_s"] * 1e9 / dec["pot3"]["weight_bytes_per_token"]
    cached = (" — with every weight in this CPU's last-level cache, where the bound is no ceiling (see the reading)"
              if _in_cache(dec["pot3"]["weight_bytes_per_token"], report.get("llc_bytes")) else "")
    lines.append(_verdict(dec["pot3"]["tokens_per_s"] / bound / RUNTIME["bound"], 1.0,
                          "pot3 decoding at 70 % of its bandwidth bound or more (tok/s ÷ bound ÷ 0.7)") + cached)
    if "peer" in report:
        q4 = report["peer"]["Q4_0"]["tokens_per_s"]
        lines.append(_verdict(dec["pot3"]["tokens_per_s"] / q4 * TARGETS["peer"], 1.0,
                              "pot3 decoding within 1.5× of llama.cpp Q4_0 (pot3 tok/s × 1.5 ÷ Q4_0 tok/s)"))
        for variant in ("pot3", "pot4"):
            if variant in dec:
                lines.append(_verdict(dec[variant]["tokens_per_s"] / q4, RUNTIME[variant],
                                      f"{variant} decoding vs llama.cpp Q4_0 tokens/s"))
        lines.append(_verdict(dec["pot3"]["prefill_tokens_per_s"] / report["peer"]["Q4_0"]["prefill_tokens_per_s"],
                              RUNTIME["prefill"], f"pot3 prefill of a {dec['pot3']['prefill_tokens']}-token prompt vs "
                                                  "llama.cpp Q4_0 tokens/s"))
        if "pot3 + embeddings" in dec:  # like for like: the Q4_0 file packs the embedding table (= head) too
            lines.append(_verdict(dec["pot3 + embeddings"]["tokens_per_s"] / q4 * TARGETS["peer"], 1.0,
                                  "pot3 with the embedding table (= head) packed too, as the Q4_0 file packs it, "
                                  "within 1.5× of llama.cpp Q4_0"))
    return lines


def _reading(report: dict) -> list[str]:
    """What explains each result, with the numbers it rests on taken from this run."""
    lines = []
    dq = {r["dtype"]: r for r in report["dequant"] if r["ratio"] is not None}
    if dq:
        lines.append(
            f"- **Dequantization.** Per element the exponent add is a few integer ops on the code (mask, "
            f"shifts, adds) and (q − z)·s a convert, a subtract and a multiply: on a CPU's vector units both "
            f"are a handful of one-cycle ops and both loops mostly move bytes, so they run at about the same "
            f"speed (fp32 {dq['fp32']['ratio']:.2f}×). The add gains where the float path must also convert "
            f"its result (fp16 {dq['fp16']['ratio']:.2f}×: this CPU has no fp16 arithmetic); rounding a float "
            f"to bf16 is itself only an integer add and a shift (bf16 {dq['bf16']['ratio']:.2f}×). The thesis' 3.66× and 1.48× are "
            f"GPU measurements.")
    hot, dec = report["gemv"]["hot"], report["gemv"]["decoding"]
    shape = next(iter(hot))
    lines.append(
        f"- **GEMV.** Hot, a float32 weight repeated call after call is served from cache, while the fused "
        f"kernel spends a byte shuffle, a shift and a table lookup per 16 weights besides the multiply-add: "
        f"{hot[shape]['fp32'] / hot[shape]['pot3']:.2f}× on {shape}. In decoding every weight comes from "
        f"memory once per token, and 3-bit codes are about a tenth of the float32 bytes: "
        f"{dec[shape]['fp32'] / dec[shape]['pot3']:.2f}× on the same shape. Smaller shapes gain less: a call "
        f"has a fixed cost of some microseconds (Python, the extension call, waking threads).")
    d = report["decode"]
    pot3, flt = d["pot3"], d["float32"]
    packed_head = pot3["head_bytes"] < flt["head_bytes"] / 2  # the GGUF's Q8_0 table kept 8-bit, as potq now does
    head = ("the output head, kept 8-bit as the GGUF's Q8_0 token table it is (no change in perplexity) and read "
            "by the int8 GEMV" if packed_head else "the output head, which weights-only quantization leaves in "
            "float32 (it is the embedding table when tied)")
    lines.append(
        f"- **Decoding.** A pot3 token reads {pot3['weight_bytes_per_token'] / 1e6:.0f} MB of weights against "
        f"float32's {flt['weight_bytes_per_token'] / 1e6:.0f} MB; {pot3['head_bytes'] / 1e6:.0f} MB of "
        f"those are {head}; `pot3 + embeddings` packs it in PoT, at a cost in perplexity (see the seed table). "
        f"Supported models ({pot3.get('path', 'python')} path here) decode natively: one C++ call a token runs "
        f"every layer on one thread team; the PoT layers take the 8-bit-activation kernel (the input rounded "
        f"to int8 per group, exact integer sums of ±2^f·x, one float scale per group), which is why the "
        f"greedy-tokens column compares with the PyTorch path. " + _kernel_reading(report.get("q8_isa")) +
        " The 'of bound' column shows how far each run is from reading its weights at full memory bandwidth.")
    if pot3.get("step_ms") and "projections" in pot3["step_ms"]:
        lines.append(_step_reading(pot3, report["read_gb_s"], packed_head, report["gemv"], report.get("llc_bytes")))
    if "peer" in report:
        q4 = report["peer"]["Q4_0"]
        lines.append(
            f"- **llama.cpp** also runs a whole token in one C++ graph (Q4_0: {q4['tokens_per_s']:.0f} tok/s, "
            f"prefill {q4['prefill_tokens_per_s']:.0f} tok/s). Its k-quants need rows whose width is a multiple "
            f"of 256; where a model's are not, its quantizer falls back to other types for those tensors, so "
            f"the Q3_K_M and Q2_K files can be barely smaller than Q4_0 (file column).")
    return lines


def _step_reading(pot3: dict, read_gb_s: float, packed_head: bool, gemv_us: dict, llc_bytes: int | None) -> str:
    """Where a pot3 step's time goes (the breakdown table), what limits its products, and what would
    have to give for the bandwidth target."""
    p = pot3["step_ms"]
    block_bytes = pot3["weight_bytes_per_token"] - pot3["head_bytes"]
    products = block_bytes / p["projections"] / 1e6
    head = pot3["head_bytes"] / p["output head"] / 1e6
    target_ms = pot3["weight_bytes_per_token"] / (read_gb_s * 1e9 * RUNTIME["bound"]) * 1e3
    in_cache = _in_cache(pot3["weight_bytes_per_token"], llc_bytes)
    short = 1e3 / pot3["tokens_per_s"] > target_ms  # the bandwidth target missed
    return (f"- **Where the step goes** (breakdown table): of a pot3 step's {p['step']:.2f} ms, the layers' "
            f"products take {p['projections']:.2f} ms (the blocks' {block_bytes / 1e6:.0f} MB read at "
            f"{products:.1f} GB/s; measured read bandwidth {read_gb_s:.1f} GB/s), the "
            f"{'8-bit' if packed_head else 'float32'} output head {p['output head']:.2f} ms "
            f"({pot3['head_bytes'] / 1e6:.0f} MB at {head:.1f} GB/s), attention {p['attention']:.2f} ms, the "
            f"elementwise steps {p['elementwise']:.2f} ms, waiting at barriers {p['waiting']:.2f} ms and the call "
            f"from Python {p['outside']:.2f} ms. "
            + (_products_limit(gemv_us, products, read_gb_s, bool(in_cache)) + " " + in_cache).strip()
            + (f" At 70 % of the bound a token would take {target_ms:.2f} ms." if short else ""))


def _products_limit(gemv_us: dict, products_gb_s: float, read_gb_s: float, in_cache: bool = False) -> str:
    """What sets the products' pace, read off the 8-bit-activation layer timed alone on the largest
    block shape: hot (its instructions alone) against streamed from memory — which decoding is not
    where the weights stay ``in_cache`` (then the two times are only stated)."""
    hot, streamed = gemv_us["hot"], gemv_us["decoding"]
    shape = next((s for s in list(hot)[1:] if gemv.Q8_COLUMN in hot[s]), None)  # the first is the head
    if shape is None:
        return ""
    h, d = hot[shape][gemv.Q8_COLUMN], streamed[shape][gemv.Q8_COLUMN]
    if in_cache:
        return (f"Alone on one thread, one such layer ({shape}) takes {h:.1f} µs on weights in cache and {d:.1f} µs "
                f"on weights streamed from memory (GEMV tables).")
    if d < 1.25 * h:
        return (f"One such layer ({shape}) alone on one thread takes about as long on weights streamed from memory "
                f"as on weights in cache ({d:.1f} µs against {h:.1f} µs, GEMV tables), so its instructions — "
                f"unpacking the codes, the multiply-adds — set the products' pace, not memory.")
    slower = (" and two cores' reads stay below the bandwidth of one long read" if products_gb_s < read_gb_s else "")
    return (f"One such layer ({shape}) alone on one thread takes {d / h:.1f}× as long on weights streamed from "
            f"memory as on weights in cache ({d:.1f} µs against {h:.1f} µs, GEMV tables): a core waits on its "
            f"reads (the misses one core keeps in flight, which the loop's prefetching 4 KiB ahead raises){slower}.")


def _in_cache(weight_bytes: int, llc_bytes: int | None) -> str:
    """A CPU whose last-level cache holds every weight a token reads keeps them there from token to
    token: the bound from memory bandwidth, measured on a read far larger than the cache, is then no
    ceiling, and a read rate above it is the cache's."""
    if not llc_bytes or weight_bytes >= llc_bytes:
        return ""
    return (f"This CPU's last-level cache ({llc_bytes / 2**20:.0f} MiB) holds every weight a token reads "
            f"({weight_bytes / 1e6:.0f} MB), so from token to token they stay in cache: decoding runs at the pace "
            f"of cached weights (the hot GEMV column), the memory bound is no ceiling here, and a read rate above "
            f"the measured bandwidth is the cache's.")


def _kernel_reading(isa: str | None) -> str:
    """How the 8-bit-activation kernel this run used spends its instructions."""
    if isa == "vnni":
        return ("On this CPU (AVX-512 VNNI) it takes 64 weights a step: a byte-table lookup makes each weight "
                "±2^f plus an offset, one vpdpbusd multiplies the 64 bytes by 64 activations and sums them into "
                "16 lanes (the offset's share, known from the activations, is taken off per group), four rows "
                "are reduced and scaled together, and a prompt's tokens four at a time — about a third of the "
                "AVX2 loop's instructions.")
    if isa == "avx2":
        return ("On this CPU (AVX2) it takes 32 weights a step in about a dozen vector instructions (table "
                "lookups, a sign, u8×s8 multiply-adds widened to 32 bits).")
    return "This CPU runs its scalar loop."


def _show(md: list[str]) -> None:
    print("\n".join(md[-40:]), flush=True)


def _write(out_md: Path, md: list[str], report: dict) -> None:
    write_text_atomic(out_md.with_suffix(".json"), json.dumps(report, indent=1))
    write_text_atomic(out_md, "\n".join(md) + "\n")
    print(f"-> {out_md}")
