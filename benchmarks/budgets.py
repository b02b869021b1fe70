"""Perplexity at a bit budget: one table per budget (≤ 2.25, ≤ 3.25, ≤ 4.25 bits/weight, scales
included), the machine-readable summary of every measured row, and the plot of perplexity
against bits/weight — all views of the ``benchmarks/ppl_table.py`` store, nothing measured here.

    python benchmarks/budgets.py --model smollm2-135m --out docs/results/budgets

Each table holds the decisive rows of its budget, all measured on the full test set: the best
PoT and APoT rows, the best uniform row, the best uniform row with the better one's recipe (its twin),
the two-step PoT row the budget had before the staged methods, and the llama.cpp row closest to
the budget (over it, llama.cpp has no type that small for this model); a budget with no such row is
left out. ``--summary`` gets one record per measured row and data set of every model's store —
model, format, recipe, bits/weight, data set, windows, perplexity — and the ``ppl_table.py``
command that measures it again.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from ppl_table import EXPANDED, PEER, parse_row

from potq.models.registry import short_names
from potq.paths import write_text_atomic

BUDGETS = (2.25, 3.25, 4.25)
PEERS = {2.25: "llama.cpp:Q2_K", 3.25: "llama.cpp:Q3_K_M", 4.25: "llama.cpp:Q4_0"}
TARGETS = {2.25: 250.0, 3.25: 38.0, 4.25: 25.5}  # issue 50's WikiText-2 targets for PoT on SmolLM2-135M
TARGET_MODEL = "smollm2-135m"
TWOSTEP = {2.25: "pot:2:twostep:64", 3.25: "pot:3:twostep:64", 4.25: "pot:4:grid:64,objective=act"}
DATASETS = ("wikitext2", "c4", "ptb")


def full(r: dict, dataset: str) -> bool:
    return dataset in r and r[dataset]["windows"] == r[dataset]["total_windows"]


def family(spec: str) -> str:
    """pot (pot, pot-zero, pot-seed), apot (additive PoT: sums of two powers of two), uniform or llama.cpp."""
    return "llama.cpp" if spec.startswith(PEER) else spec.split(":")[0].split("-")[0]


def recipe(spec: str) -> str:
    """What a row did, without its format and bits: ``pot:3:blockap+e2e:64`` -> ``blockap+e2e:64``."""
    return ":".join(spec.split(",")[0].split(":")[2:]) + "".join(f",{s}" for s in spec.split(",")[1:])


def command(model: str, spec: str, r: dict, dataset: str) -> str:
    windows = "" if full(r, dataset) else f" --max-windows {r[dataset]['windows']}"
    group = r.get("group_size")
    default = None if spec == "float" or spec.startswith(PEER) else parse_row(spec, 128)["group_size"]
    groups = f" --group-size {group}" if default is not None and group != default else ""  # the store's default
    return (f"python benchmarks/ppl_table.py --model {model}{groups} --dataset {dataset}{windows} "
            f"--ctx {r[dataset]['ctx']} --rows {shlex.quote(spec)} --force --out /tmp/check")


def summary(model: str, runs: dict) -> list[dict]:
    """One record per row and data set of a model's store."""
    records = []
    for spec, r in runs.items():
        for dataset in [k for k, v in r.items() if isinstance(v, dict) and "ppl" in v and "ctx" in v]:
            row = None if spec == "float" or spec.startswith(PEER) else parse_row(spec, r.get("group_size") or 128)
            records.append({"model": model, "row": spec, "format": row["format"] if row else spec.split(":")[-1],
                            "bits": row["bits"] if row else None, "group_size": r.get("group_size"),
                            "recipe": row["method"].replace(",", "+") if row else r.get("method") or "float",
                            "settings": r.get("settings") or {}, "bits_per_weight": r["bits_per_weight"],
                            "dataset": dataset, "windows": r[dataset]["windows"],
                            "total_windows": r[dataset]["total_windows"], "ctx": r[dataset]["ctx"],
                            "ppl": r[dataset]["ppl"], "dtype": r[dataset].get("dtype"),
                            "quantize_seconds": r.get("quantize_seconds"),
                            "peak_memory_bytes": r.get("peak_memory_bytes"),
                            "command": command(model, spec, r, dataset)})
    return records


def every_store(folder: Path) -> list[dict]:
    """The summary of every model's ``ppl_table.py`` store in ``folder`` (``MODEL-runs.json`` for a
    model potq names; the stores of settings' short runs have other names)."""
    return [record for name in short_names() if (folder / f"{name}-runs.json").exists()
            for record in summary(name, json.loads((folder / f"{name}-runs.json").read_text()))]


def decisive(runs: dict, budget: float) -> list[tuple[str, str]]:
    """``(why, row)`` for the rows a budget's table shows."""
    inside = {s: r for s, r in runs.items() if s != "float" and not s.startswith(PEER) and full(r, "wikitext2")
              and budget - 1 < r["bits_per_weight"] <= budget + 1e-9}
    best = {}
    for fam in ("pot", "apot", "uniform"):
        mine = [s for s in inside if family(s) == fam]
        if mine:
            best[fam] = min(mine, key=lambda s: inside[s]["wikitext2"]["ppl"])
    chosen = [(why, best[fam]) for why, fam in (("best PoT", "pot"), ("best APoT", "apot")) if fam in best]
    if chosen:
        lead = min((s for _, s in chosen), key=lambda s: inside[s]["wikitext2"]["ppl"])
        stages = parse_row(lead, 128)["method"]  # the twin: uniform with the same stages, any group or settings
        twins = [s for s in inside if family(s) == "uniform" and parse_row(s, 128)["method"] == stages]
        if twins:
            chosen.append(("uniform, same recipe", min(twins, key=lambda s: inside[s]["wikitext2"]["ppl"])))
    if "uniform" in best and best["uniform"] not in [s for _, s in chosen]:
        chosen.append(("best uniform", best["uniform"]))
    if TWOSTEP[budget] in runs and TWOSTEP[budget] not in [s for _, s in chosen] and full(runs[TWOSTEP[budget]], "wikitext2"):
        chosen.append(("PoT before (two-step)" if "twostep" in TWOSTEP[budget] else "PoT before (grid)", TWOSTEP[budget]))
    if PEERS[budget] in runs and full(runs[PEERS[budget]], "wikitext2"):
        chosen.append(("llama.cpp", PEERS[budget]))
    return chosen


def table(runs: dict, budget: float, targets: bool) -> list[str]:
    """The budget's table (empty without a decisive row) under the float reference row, with the
    verdict on its target if ``targets``."""
    if not decisive(runs, budget):
        return []
    lines = [f"## ≤ {budget} bits/weight", "",
             "| row | recipe | bits/weight | WikiText-2 | C4 | PTB | quantize s | peak GiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    reference = [("float", "float")] if "float" in runs and full(runs["float"], "wikitext2") else []
    for why, spec in reference + decisive(runs, budget):
        r = runs[spec]
        ppl = " | ".join(f"{r[d]['ppl']:.2f}" if full(r, d) else "–" for d in DATASETS)
        peak = f"{r['peak_memory_bytes'] / 2**30:.2f}" if r.get("peak_memory_bytes") else "–"
        seconds = f"{r['quantize_seconds']:.0f}{'*' if r.get('shared_machine') else ''}" \
            if r.get("quantize_seconds") else "–"
        lines.append(f"| {why} | `{spec}` | {r['bits_per_weight']:.3f} | {ppl} | {seconds} | {peak} |")
    rows = dict((why, runs[spec]) for why, spec in decisive(runs, budget))
    uniform = min((r["wikitext2"]["ppl"] for why, r in rows.items() if why.startswith(("best uniform", "uniform"))),
                  default=None)
    for why, name in (("best PoT", "PoT"), ("best APoT", "APoT")):
        if why not in rows:
            continue
        ppl = rows[why]["wikitext2"]["ppl"]
        against = (None if uniform is None else
                   f"{'below' if ppl < uniform else 'above'} the best uniform row here ({uniform:.2f})")
        if targets:
            verdict = "met" if ppl <= TARGETS[budget] else f"missed by {ppl - TARGETS[budget]:.2f}"
            lines += ["", f"Target for {name} on WikiText-2: ≤ {TARGETS[budget]}: {verdict} ({ppl:.2f})"
                      + (f"; {against}." if against else ".")]
        elif against:
            lines += ["", f"{name} on WikiText-2: {ppl:.2f}, {against}."]
    return lines + [""]


def reference_note(model: str) -> str:
    """What the float row is, for a model whose float reference is a quantized file's weights."""
    if model not in EXPANDED:
        return ""
    return (f" The float row is the model's {EXPANDED[model]} GGUF expanded to float, itself a quantized model: "
            f"its perplexity is the reference every row is measured against, not a bound below them.")


def plot(runs: dict, path: Path) -> None:
    """WikiText-2 perplexity against bits/weight: every full-test-set row, and each family's
    best-so-far front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"pot": ("tab:red", "o"), "apot": ("tab:orange", "s"), "uniform": ("tab:blue", "D"),
              "llama.cpp": ("tab:green", "*")}
    for fam, (color, marker) in styles.items():
        points = sorted((r["bits_per_weight"], r["wikitext2"]["ppl"]) for s, r in runs.items()
                        if s != "float" and family(s) == fam and full(r, "wikitext2"))
        if not points:
            continue
        ax.scatter(*zip(*points), color=color, marker=marker, alpha=0.35, s=18)
        front, low = [], float("inf")
        for x, y in points:
            if y < low:
                front.append((x, y))
                low = y
        ax.plot(*zip(*front), color=color, marker=marker, label=f"{fam}: best at each size")
    if "float" in runs and "wikitext2" in runs["float"]:
        ax.axhline(runs["float"]["wikitext2"]["ppl"], color="k", lw=1, label="float")
    for budget in BUDGETS:
        ax.axvline(budget, color="grey", lw=0.6, ls=":")
    ax.set_yscale("log")
    ax.set_ylim(top=min(ax.get_ylim()[1], 1e4))
    ax.set_xlabel("bits per weight, scales included")
    ax.set_ylabel("WikiText-2 perplexity (log scale)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--store", default=None, help="the ppl_table.py store (default docs/results/MODEL-runs.json)")
    p.add_argument("--out", required=True, help="output path without extension (.md is written)")
    p.add_argument("--summary", default="docs/results/summary.json")
    p.add_argument("--plot", default="docs/results/plots/ppl-vs-bpw.png")
    args = p.parse_args()
    runs = json.loads(Path(args.store or f"docs/results/{args.model}-runs.json").read_text())
    this = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    lines = [f"# {args.model}: perplexity at a bit budget", "", "```", this, "```", "",
             "Full test sets at context 2048; bits/weight count every quantized matrix of the transformer blocks "
             "with its scales and zero points (llama.cpp's as its blocks store them). A dash: not measured. "
             "Each row's command is in `summary.json`; recipes are `FORMAT:BITS:STAGES:GROUP` rows of "
             "`benchmarks/ppl_table.py` (`blockap+e2e` is `--method blockap,e2e`)." + reference_note(args.model), "",
             f"![perplexity against bits per weight]({Path(args.plot).relative_to(Path(args.out).parent)})", ""]
    for budget in BUDGETS:
        lines += table(runs, budget, args.model == TARGET_MODEL)
    if any(r.get("shared_machine") for r in runs.values()):
        lines += ["\\* quantized while other jobs shared the cores: that time is not the method's own."]
    lines += ["Peak GiB: the quantizing process's peak resident memory (the float model it starts from "
              "included); a dash where the row was measured before it was recorded.", ""]
    write_text_atomic(Path(args.out).with_suffix(".md"), "\n".join(lines))
    write_text_atomic(Path(args.summary), json.dumps(every_store(Path(args.summary).parent), indent=1))
    plot(runs, Path(args.plot))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
