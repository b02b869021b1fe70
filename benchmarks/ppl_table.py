"""Perplexity table: float vs quantized rows of one model, each quantized, saved, reloaded from
disk and evaluated with the same windows. Writes a Markdown table and the raw JSON.

    python benchmarks/ppl_table.py --model smollm2-135m --rows float uniform:4 pot:4 uniform:3 pot:3 \
        --dataset wikitext2 --out docs/results/rtn-wikitext2

A row is ``float`` or ``FORMAT:BITS[:METHOD[:GROUP]][,key=value...]``: method default rtn, group
size default ``--group-size``, and ``key=value`` settings passed to the method (e.g.
``pot:3:twostep:64,grad=ste``). ``llama.cpp:KIND`` (``Q4_0``, ``Q3_K_M``, ``Q2_K``) is the peer:
the model's GGUF requantized by llama.cpp's own quantizer (the optional ``potq[peer]`` extra),
loaded by potq's GGUF loader and evaluated by the same code on the same windows.

Every measurement goes to a store (``--store``, default ``docs/results/MODEL-runs.json``) keyed by
row; a table (``--out``) is a view of some rows. Rows already in the store are not measured
again (per row and data set), and a quantized folder already in ``--work`` is reloaded instead of
quantized again, so a long table fills in over several runs, tables share rows, and a data set
can be added later without re-quantizing. ``--force`` redoes the listed rows; a row holding a
cell of an earlier quantization (marked ‡) is redone without it.

Every cell records the sha256 of the weights it was measured on. A row quantized again (its
folder gone, as on a fresh machine) is evaluated again on every data set it holds, so a row's
cells never mix two quantizations; the cells it replaces are kept under ``earlier`` (a
block-wise method run again on another CPU need not give the same bits).
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from pathlib import Path

import torch

import potq
from potq.bench.timing import LoadWatch, PeakMemory, machine
from potq.eval import perplexity
from potq.info import summary
from potq.paths import sha256_of_files, write_text_atomic
from potq.storage import read_manifest


PEER = "llama.cpp:"


def parse_settings(pairs: list[str]) -> dict:
    """``["grad=ste", "epochs=20"]`` -> ``{"grad": "ste", "epochs": 20}`` (numbers and booleans parsed;
    ``True``/``False`` too, the spelling :func:`canonical` writes them in)."""
    settings = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        value = value.lower() if value in ("True", "False") else value
        settings[key] = json.loads(value) if value[:1].isdigit() or value in ("true", "false") else value
    return settings


def parse_row(spec: str, default_group: int) -> dict:
    """``pot:3:twostep:64,grad=ste`` -> format, bits, method, group size, settings. A staged
    method joins its stages with ``+`` here (``pot:3:awq+blockap:64``), commas being taken."""
    head, *pairs = spec.split(",")
    fmt, bits, *rest = head.split(":")
    return {"format": fmt, "bits": int(bits), "method": rest[0].replace("+", ",") if rest else "rtn",
            "group_size": int(rest[1]) if len(rest) > 1 else default_group, "settings": parse_settings(pairs)}


def canonical(spec: str, default_group: int) -> str:
    """One name per measurement: ``uniform:4:rtn`` and ``uniform:4:rtn:128`` are ``uniform:4``."""
    if spec == "float" or spec.startswith(PEER):
        return spec
    row = parse_row(spec, default_group)
    name = f"{row['format']}:{row['bits']}"
    if row["method"] != "rtn" or row["group_size"] != default_group:
        name += f":{row['method'].replace(',', '+')}"
    if row["group_size"] != default_group:
        name += f":{row['group_size']}"
    return name + "".join(f",{k}={v}" for k, v in row["settings"].items())


def label_of(row: dict) -> str:
    extra = "".join(f", {k}={v}" for k, v in row["settings"].items())
    return f"{row['format']} {row['bits']}-bit {row['method']}{extra}"


def quantized_model(spec: str, float_lm: potq.LoadedModel, args: argparse.Namespace, cached: dict) -> tuple:
    """The row's saved folder (made now or found in ``--work``) loaded back, and its record.

    The quantization record is also kept in the folder (``quantize.json``), so a run stopped
    during the evaluation does not quantize the row again."""
    row = parse_row(spec, args.group_size)
    folder = row_folder(spec, args)
    record = {k: cached[k] for k in ("quantize_seconds", "blocks", "mean_load", "shared_machine", "machine",
                                     "peak_memory_bytes") if k in cached}
    kept = folder / "quantize.json"
    if not record and kept.exists() and (folder / "potq.json").exists():
        record = json.loads(kept.read_text())
    if args.force or not (folder / "potq.json").exists() or "quantize_seconds" not in record:
        lm = potq.LoadedModel(copy.deepcopy(float_lm.model), float_lm.tokenizer, float_lm.source)
        start = time.perf_counter()
        with LoadWatch() as load, PeakMemory() as memory:
            potq.quantize_(lm, potq.QuantConfig(row["format"], row["bits"], row["group_size"]),
                           method=row["method"], **row["settings"])
        record = {"quantize_seconds": time.perf_counter() - start,
                  "blocks": getattr(lm.model, "potq_report", {}).get("blocks"),
                  "mean_load": load.mean, "shared_machine": load.shared(torch.get_num_threads()),
                  "machine": machine(), "peak_memory_bytes": memory.peak_bytes}
        kept.unlink(missing_ok=True)  # this script's own file: potq.save overwrites only what potq wrote
        potq.save(lm, folder, overwrite=True)
        write_text_atomic(kept, json.dumps(record))
    s = summary(folder)
    record.update(label=label_of(row), group_size=row["group_size"], method=row["method"],
                  bits_per_weight=s["bits_per_quantized_weight"], file_bytes=s["file_bytes"],
                  settings=read_manifest(folder)["method_settings"],
                  weights_sha256=sha256_of_files([folder / "model.safetensors"]))
    return potq.load(folder), record


def row_folder(spec: str, args: argparse.Namespace) -> Path:
    """Where the row's quantized model is saved (``--work``/MODEL/ROW)."""
    return Path(args.work) / args.model / spec.replace(":", "-").replace(",", "-").replace("=", "")


def peer_model(spec: str, float_lm: potq.LoadedModel, args: argparse.Namespace, cached: dict) -> tuple:
    """The row's GGUF, requantized by llama.cpp from the model's own GGUF (kept in ``--work``),
    loaded by potq."""
    from potq.bench import peer

    source = Path(float_lm.source["path"])
    if source.suffix != ".gguf" or not peer.available():
        raise SystemExit(f"{spec}: needs a GGUF model and llama-cpp-python (pip install -e .[peer])")
    kind, folder = spec[len(PEER):], Path(args.work) / args.model
    folder.mkdir(parents=True, exist_ok=True)
    fresh = args.force or "quantize_seconds" not in cached
    if fresh:  # timed from scratch
        peer.requantized_path(source, kind, folder).unlink(missing_ok=True)
    start = time.perf_counter()
    path = peer.requantized(source, kind, folder)
    seconds = time.perf_counter() - start if fresh else cached["quantize_seconds"]
    record = {"label": f"llama.cpp {kind} (requantized from {source.name})", "group_size": None, "method": spec,
              "bits_per_weight": peer.block_bits_per_weight(path), "file_bytes": path.stat().st_size,
              "quantize_seconds": seconds, **({"machine": machine()} if fresh else {})}
    return potq.load_model(str(path)), record


def run_row(spec: str, float_lm: potq.LoadedModel, args: argparse.Namespace, cached: dict) -> dict:
    todo = [d for d in args.dataset if args.force or not _same_windows(cached.get(d), args)]
    if spec == "float":
        lm, result = float_lm, {"label": "float", "bits_per_weight": 32.0, "file_bytes": None,
                                "quantize_seconds": 0.0, "group_size": None, "method": None}
    elif not todo and "quantize_seconds" in cached and not mixed(cached) and (
            spec.startswith(PEER) or not (row_folder(spec, args) / "potq.json").exists()):
        return cached  # nothing to measure, and no saved weights to check the cells against
    elif spec.startswith(PEER):
        lm, result = peer_model(spec, float_lm, args, cached)
    else:
        lm, result = quantized_model(spec, float_lm, args, cached)
        digest = result["weights_sha256"]
        todo = [d for d in dict.fromkeys([*args.dataset, *held_datasets(cached)])
                if d in todo or cached.get(d, {}).get("weights_sha256") != digest]
    result = {**cached, **result, "row": spec}
    for dataset in todo:
        r = perplexity(lm.model, lm.tokenizer, dataset, ctx=args.ctx, max_windows=args.max_windows,
                       dtype=args.dtype)
        if dataset in cached:  # measured on other weights or windows: kept, not lost, with what it measured
            made = {k: cached[k] for k in ("machine", "quantize_seconds", "weights_sha256") if k in cached}
            result["earlier"] = [*result.get("earlier", []), {**cached[dataset], "quantization": made}]
        result[dataset] = {**r.to_dict(), "machine": machine(), "weights_sha256": result.get("weights_sha256")}
        print(f"{result['label']}: {dataset} ppl {r.ppl:.3f} ({r.windows}/{r.total_windows} windows)", flush=True)
    return result


def _same_windows(result: dict | None, args: argparse.Namespace) -> bool:
    """A stored result counts only if it was measured on the windows asked for now."""
    if result is None or result["ctx"] != args.ctx:
        return False
    wanted = result["total_windows"] if args.max_windows is None else min(args.max_windows, result["total_windows"])
    return result["windows"] == wanted


# the models whose float reference is a quantized GGUF's weights, expanded (by the GGUF's type)
EXPANDED = {"smollm2-135m": "Q4_1", "gemma3-270m": "Q4_K_M"}
BF16_MARK = "†"
EARLIER_MARK = "‡"
MACHINE_NOTE = "Quantization times"  # how the note on machines begins (README copies it with the table)
# The store's rows measured before it recorded a machine all ran on this one (its speed report,
# docs/results/speed.json, names the CPU; the sessions' notes its native bf16).
EARLIER_MACHINE = "Intel(R) Xeon(R) Processor @ 2.80GHz, AVX512 with native bf16, 2 threads"


def earlier_weights(r: dict, dataset: str) -> bool:
    """Whether the row's ``dataset`` cell was measured on another quantization than the row's latest
    (the one its time and the other cells come from). Known from the weights' sha256 where the
    cell records it; for older cells, a cell evaluated on another machine than the one that
    quantized the row (quantized folders never leave their machine). Rows of data-free methods
    (rtn, grid with objective mse) give the same bits again and are never marked."""
    data_free = r["method"] in (None, "rtn") or (r["method"] == "grid" and r["settings"].get("objective") == "mse")
    cell = r[dataset]
    if data_free or r["row"].startswith(PEER):
        return False
    if "weights_sha256" in cell:
        return cell["weights_sha256"] != r.get("weights_sha256")
    return "machine" in r and cell.get("machine") != r["machine"]


def mixed(r: dict) -> bool:
    """Whether a stored row holds a cell of an earlier quantization (a ‡ cell): such a row is
    quantized again and evaluated again on all its data sets, so its cells come from one."""
    return "row" in r and any(earlier_weights(r, d) for d in held_datasets(r))


def held_datasets(r: dict) -> list[str]:
    """The data sets a stored row holds a perplexity cell for."""
    return [k for k, v in r.items() if isinstance(v, dict) and "dataset" in v]


def machine_of(r: dict) -> str:
    return r.get("machine", EARLIER_MACHINE)


def machine_marks(results: list[dict]) -> dict[str, str]:
    """A mark per machine the quantized rows' times were measured on (``" (A)"``, ...), empty when
    one machine timed them all: a time only compares with times from the same machine."""
    machines = _machines(results)
    return {m: f" ({chr(65 + i)})" for i, m in enumerate(machines)} if len(machines) > 1 else {}


def machine_lines(results: list[dict]) -> list[str]:
    """The table's note on where its quantization times were measured."""
    machines, marks = _machines(results), machine_marks(results)
    if not marks:
        return [f"{MACHINE_NOTE} measured on {machines[0]}, torch {torch.__version__}."] if machines else []
    return [f"{MACHINE_NOTE} were measured on more than one machine; compare them only within one: " +
            "; ".join(f"{marks[m].strip()} {m}" for m in machines) + "."]


def _machines(results: list[dict]) -> list[str]:
    return list(dict.fromkeys(machine_of(r) for r in results if r["row"] != "float"))


def markdown(results: list[dict], args: argparse.Namespace, command: str, missing: list[str] = ()) -> str:
    float_name = f"float ({EXPANDED[args.model]}-expanded, fp32)" if args.model in EXPANDED else "float (fp32)"
    datasets = [d for d in args.dataset if any(d in r for r in results)]
    head = "| model | G | bits/weight (incl. scales) | " + " | ".join(f"{d} ppl" for d in datasets)
    lines = [head + " | file MiB | quantize s | peak GiB |", "|" + " --- |" * (6 + len(datasets))]
    marks = machine_marks(results)
    for r in results:
        label = float_name if r["row"] == "float" else r["label"]
        ppls = " | ".join(f"{r[d]['ppl']:.2f}{BF16_MARK if r[d].get('dtype') == 'bf16' else ''}"
                          f"{EARLIER_MARK if earlier_weights(r, d) else ''}" if d in r else "–" for d in datasets)
        size = "–" if r["file_bytes"] is None else f"{r['file_bytes'] / 2**20:.1f}"
        note = ("*" if r.get("shared_machine") else "") + ("" if r["row"] == "float" else marks.get(machine_of(r), ""))
        peak = f"{r['peak_memory_bytes'] / 2**30:.2f}" if r.get("peak_memory_bytes") else "–"
        lines.append(f"| {label} | {r['group_size'] or '–'} | {r['bits_per_weight']:.3f} | {ppls} | {size} | "
                     f"{r['quantize_seconds']:.1f}{note} | {peak} |")
    if any(r.get("shared_machine") for r in results):
        lines += ["", "\\* quantized while other jobs shared the cores (mean load above the job's threads + 1): that "
                  "time is not representative."]
    if any(r[d].get("dtype") == "bf16" for r in results for d in datasets if d in r):
        lines += ["", f"{BF16_MARK} evaluated in bf16 autocast (`--dtype auto` on a CPU with native bf16); the "
                  "other perplexities in fp32."]
    if any(earlier_weights(r, d) for r in results for d in datasets if d in r):
        lines += ["", f"{EARLIER_MARK} measured on an earlier quantization of the row than the one its time and its "
                  "unmarked cells come from: the row was quantized again, on another machine, to add a data set, "
                  "and a method that learns from calibration data need not give the same bits on another CPU. "
                  "Such a row is evaluated again on all its data sets the next time it is quantized."]
    if any(r["row"].startswith(PEER) for r in results):
        lines += ["", "llama.cpp rows: the model's shipped GGUF requantized by llama.cpp's own quantizer (so rounded "
                      "twice: Q4_1, then the row's type) and evaluated by potq on the same windows. Bits/weight count "
                      "the transformer blocks' matrices, as for potq's rows; unlike potq's rows, llama.cpp also "
                      "quantizes the token embedding and head (hence the smaller file), and its k-quants fall back "
                      "to wider types on rows that are not a multiple of 256 wide (SmolLM2's 576)."]
    windows = ", ".join(f"{d} {r[d]['windows']} of {r[d]['total_windows']}" for d in datasets
                        for r in results[:1] if d in r)
    return "\n".join([
        f"# {args.model}: perplexity, ctx {args.ctx}",
        "",
        f"Windows evaluated: {windows} (fp32, or bf16 where marked {BF16_MARK}); each quantized row is saved, reloaded "
        "from disk, then evaluated. Calibration for data-dependent methods: 32×512 tokens of the C4 "
        "calibration half, seed 0. A dash: not measured yet.",
        *machine_lines(results),
        "",
        "```",
        command,
        "```",
        "",
        *lines,
        "",
        *([f"Not measured yet: {', '.join(missing)}.", ""] if missing else []),
    ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rows", nargs="+", default=["float", "uniform:4", "pot:4", "uniform:3", "pot:3"])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--dataset", nargs="+", default=["wikitext2"])
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"))
    p.add_argument("--work", default="out/bench", help="where the quantized folders are kept")
    p.add_argument("--force", action="store_true", help="quantize and evaluate the listed rows again")
    p.add_argument("--no-measure", action="store_true",
                   help="only write the table of what the store already holds (rows not in it are listed)")
    p.add_argument("--store", default=None, help="JSON of every measured row (default docs/results/MODEL-runs.json)")
    p.add_argument("--out", required=True, help="output path without extension (.md and .json are written)")
    args = p.parse_args()
    args.rows = [canonical(spec, args.group_size) for spec in args.rows]
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    store = Path(args.store or f"docs/results/{args.model}-runs.json")
    runs = json.loads(store.read_text()) if store.exists() else {}
    if args.no_measure:  # a view of what the store holds
        results = [runs[spec] for spec in args.rows if spec in runs]
        missing = [spec for spec in args.rows if spec not in runs]
        write_text_atomic(out.with_suffix(".md"), markdown(results, args, command, missing))
        print(out.with_suffix(".md").read_text())
        return
    float_lm = potq.load_model(args.model)
    results = []
    for spec in args.rows:  # saved after every row, so an interrupted run keeps what it measured
        results.append(run_row(spec, float_lm, args, runs.get(spec, {})))
        runs = json.loads(store.read_text()) if store.exists() else {}  # what others wrote meanwhile stays
        runs[spec] = results[-1]
        write_text_atomic(store, json.dumps(runs, indent=1))
        write_text_atomic(out.with_suffix(".json"), json.dumps({"command": command, "rows": results}, indent=1))
        write_text_atomic(out.with_suffix(".md"), markdown(results, args, command))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
