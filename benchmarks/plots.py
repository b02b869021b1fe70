"""The thesis' figures for a model, from this repo's code and result files (needs matplotlib:
``pip install -e '.[plots]'``).

    python benchmarks/plots.py --model smollm2-135m --layer model.layers.10.mlp.up_proj --out docs/results/plots

Writes into ``--out``:
- ``weight-histogram.png``: one layer's weights with the uniform and the PoT 3-bit grids of a
  typical group drawn over them (thesis Figure 3.1);
- ``step1-error-vs-b.png``: a few groups' squared error against the multiplier b (Figure 3.3);
- ``step1-b-histogram.png``: the chosen b* over every group of the model (Figure 3.4);
- ``step1-objective.png``: why the objective matters — b* under plain MSE vs the
  activation-weighted error (zero-excluded PoT), and how unevenly E[x²] spreads over the input
  channels of ``--layer`` (measured on the float model with the C4 calibration batch);
- ``ppl-vs-bits.png``: perplexity against real bits per weight, uniform vs PoT, every row of the
  ``benchmarks/ppl_table.py`` store measured on ``--dataset``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

try:
    import matplotlib
except ModuleNotFoundError:
    sys.exit("plots.py needs matplotlib: pip install -e '.[plots]'")

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import potq  # noqa: E402
from potq.formats import get_format  # noqa: E402
from potq.formats.grouping import to_groups  # noqa: E402
from potq.engine.blocks import BlockData, input_moments, run_blockwise  # noqa: E402
from potq.eval.data import calibration_batch  # noqa: E402
from potq.methods.grid import MULTIPLIERS, group_errors, search_scales  # noqa: E402
from potq.quantize import quantizable_layers  # noqa: E402


def log_plot(fig: plt.Figure, ax: plt.Axes, xlabel: str, ylabel: str, path: Path, outside: bool = False) -> None:
    """Log y axis, labels, legend (``outside`` the axes when it has many entries); save and close."""
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, **({"loc": "upper left", "bbox_to_anchor": (1.01, 1)} if outside else {}))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def weight_histogram(w: torch.Tensor, layer: str, bits: int, group_size: int, out: Path) -> None:
    """Weights of one typical group (the one whose max|w| is the layer's median) on its grids."""
    wg = to_groups(w, group_size).reshape(-1, to_groups(w, group_size).shape[-1])
    peaks = wg.abs().amax(-1)
    g = int(peaks.argsort()[len(peaks) // 2])
    group = wg[g:g + 1][None]
    fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for ax, name in zip(axes, ("uniform", "pot")):
        fmt = get_format(name, bits)
        levels = fmt.levels(fmt.init_qparams(group)).flatten().unique()
        ax.hist(group.flatten().numpy(), bins=60, color="0.6")
        for v in levels.tolist():
            ax.axvline(v, color="tab:red" if name == "pot" else "tab:blue", lw=1)
        ax.set_title(f"{name} {bits}-bit grid (round-to-nearest scale), one group of {group.shape[-1]}")
        ax.set_ylabel("weights")
    axes[-1].set_xlabel(f"weight value ({layer}, group {g})")
    fig.tight_layout()
    fig.savefig(out / "weight-histogram.png", dpi=120)
    plt.close(fig)


def error_vs_b(w: torch.Tensor, layer: str, bits: int, group_size: int, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in ("pot", "pot-zero"):
        errors = group_errors(w, get_format(name, bits), group_size, MULTIPLIERS).flatten(1)  # [b, groups]
        for g in (0, errors.shape[1] // 3, 2 * errors.shape[1] // 3):
            curve = errors[:, g] / errors[99, g]  # relative to b = 1 (round to nearest)
            ax.plot(MULTIPLIERS.numpy(), curve.numpy(), ls="-" if name == "pot" else "--",
                    label=f"{name}, group {g}")
    ax.set_title(f"Step 1 search, {bits}-bit G{group_size}, {layer}")
    log_plot(fig, ax, "scale multiplier b", "group squared error / error at b = 1", out / "step1-error-vs-b.png")


def b_histogram(model: torch.nn.Module, bits: int, group_size: int, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in ("pot", "pot-zero"):
        fmt = get_format(name, bits)
        best = torch.cat([search_scales(m.weight.detach(), fmt, group_size)[1].flatten()
                          for m in quantizable_layers(model).values()])
        ax.hist(best.numpy(), bins=100, range=(0, 2), alpha=0.6, label=f"{name} (median {best.median():.2f})")
    ax.set_xlabel("chosen multiplier b*")
    ax.set_ylabel("groups")
    ax.set_title(f"Step 1: b* over every group, {bits}-bit G{group_size}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "step1-b-histogram.png", dpi=120)
    plt.close(fig)


def step1_objective(lm: potq.LoadedModel, layer: str, bits: int, group_size: int, out: Path) -> None:
    """b* of every group under both Step 1 objectives, beside the spread of one layer's E[x²]."""
    layers = quantizable_layers(lm.model)
    by_module = {id(m): name for name, m in layers.items()}
    moments: dict[str, torch.Tensor] = {}

    def measure(_index: int, block: torch.nn.Module, data: BlockData, _targets: list) -> None:
        moments.update({by_module[id(block.get_submodule(n))]: x for n, x in input_moments(block, data).items()})

    calibration = calibration_batch(lm.tokenizer, 32, 512, seed=0)
    run_blockwise(lm.model, calibration, measure, targets=False)
    fmt = get_format("pot", bits)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for objective in ("mse", "act"):
        best = torch.cat([search_scales(m.weight.detach(), fmt, group_size,
                                        column_weight=moments[n] if objective == "act" else None)[1].flatten()
                          for n, m in layers.items()])
        left.hist(best.numpy(), bins=100, range=(0, 2), alpha=0.6, label=f"{objective} (median {best.median():.2f})")
    left.set_xlabel("chosen multiplier b*")
    left.set_ylabel("groups")
    left.set_title(f"Step 1 b* by objective, pot {bits}-bit G{group_size}")
    left.legend()
    energy = moments[layer].sort(descending=True).values
    right.semilogy(range(1, len(energy) + 1), (energy / energy.median()).numpy())
    right.set_xlabel("input channel, by E[x²] (largest first)")
    right.set_ylabel("E[x²] / median")
    right.set_title(f"input of {layer}")
    fig.tight_layout()
    fig.savefig(out / "step1-objective.png", dpi=120)
    plt.close(fig)


def ppl_vs_bits(store: Path, dataset: str, out: Path) -> None:
    """Every stored row measured on ``dataset``: one line per (format, method, G, settings)."""
    fig, ax = plt.subplots(figsize=(11, 5))
    series: dict[str, list[tuple[float, float]]] = {}
    for spec, r in json.loads(store.read_text()).items():
        if dataset not in r:
            continue
        if spec == "float":
            ax.axhline(r[dataset]["ppl"], color="k", lw=1, label="float")
            continue
        head, *extra = spec.split(",")
        fmt = head.split(":")[0]
        name = (r["method"].replace(":", " ") if r["group_size"] is None  # a peer: one point per kind
                else f"{fmt} {r['method']} G{r['group_size']}" + "".join(f", {e}" for e in extra))
        series.setdefault(name, []).append((r["bits_per_weight"], r[dataset]["ppl"]))
    styles = {"pot": ("-", "o"), "pot-zero": ("-.", "s"), "uniform": ("--", "D"), "llama.cpp": ("", "*")}
    colors = plt.cm.tab20.colors
    for i, (name, points) in enumerate(sorted(series.items())):
        points.sort()
        ls, marker = styles.get(name.split(" ")[0], ("-", "o"))
        ax.plot(*zip(*points), ls=ls, marker=marker, color=colors[i % len(colors)], label=name)
    log_plot(fig, ax, "bits per weight, scales included", f"{dataset} perplexity (log scale)", out / "ppl-vs-bits.png",
             outside=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layer", default="model.layers.10.mlp.up_proj")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--store", type=Path, default=None,
                   help="ppl_table.py store for the perplexity plot (default docs/results/MODEL-runs.json)")
    p.add_argument("--dataset", default="wikitext2")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    lm = potq.load_model(args.model)
    model = lm.model
    w = model.get_submodule(args.layer).weight.detach().float()
    weight_histogram(w, args.layer, args.bits, args.group_size, args.out)
    error_vs_b(w, args.layer, args.bits, args.group_size, args.out)
    b_histogram(model, args.bits, args.group_size, args.out)
    step1_objective(lm, args.layer, args.bits, args.group_size, args.out)
    ppl_vs_bits(args.store or Path(f"docs/results/{args.model}-runs.json"), args.dataset, args.out)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    print(f"plots in {args.out}/ (made by: {command})")


if __name__ == "__main__":
    main()
