"""Loss curves of what potq trained: the char nanoGPT (``potq train-char``) and every QAT run of
``benchmarks/qat_results.py`` (needs matplotlib: ``pip install -e '.[plots]'``).

    python benchmarks/training_plots.py --model nanogpt-shakespeare --out docs/results/plots

Writes ``char-training.png`` (train/val loss against step, from the model's potq.json) and
``qat-loss.png`` (held-out loss against step of each QAT run in docs/results/qat-*.json).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import result_store  # noqa: E402
from potq.models.registry import resolve  # noqa: E402
from potq.storage import read_manifest  # noqa: E402


def char_training(model: str, out: Path) -> None:
    history = read_manifest(resolve(model)[1])["source"]["training"]["history"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for split in ("train", "val"):
        ax.plot([h["step"] for h in history], [h[split] for h in history], label=split)
    ax.set(xlabel="step", ylabel="cross-entropy (nats/char)", title=f"{model}: potq train-char")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "char-training.png", dpi=120)
    plt.close(fig)


def qat_curves(results: Path, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for model, store in result_store.stored(results, "qat"):
        for key, run in store["runs"].items():
            if run.get("training"):
                history = run["training"]["history"]
                ax.plot([h["step"] for h in history], [h["val"] for h in history], label=f"{model} {key}")
    ax.set(xlabel="QAT step", ylabel="held-out loss (nats/token)", title="PoT-QAT")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "qat-loss.png", dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="nanogpt-shakespeare")
    p.add_argument("--out", type=Path, default=Path("docs/results/plots"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    char_training(args.model, args.out)
    qat_curves(Path("docs/results"), args.out)
    print(f"-> {args.out}/char-training.png, {args.out}/qat-loss.png")


if __name__ == "__main__":
    main()
