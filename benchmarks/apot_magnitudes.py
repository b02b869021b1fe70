"""Which magnitudes an additive-PoT grid should have: the squared error of every candidate set on a
model's own block weights, against PoT's and uniform's at the same bits.

    python benchmarks/apot_magnitudes.py --model smollm2-135m --out docs/results/apot-magnitudes

A candidate is a set of ``2^(N−1)`` integers, each a sum of at most two powers of two (a multiply
by one is two shifts and an add), scaled so that the largest is the group's scale; signs are
symmetric. Each group of ``--group-size`` weights (sampled from every linear of every block) takes
its best scale from a grid of clipping ratios, for PoT, APoT and uniform alike (uniform: its
asymmetric grid with a zero point, both ends clipped). The error is relative to the weights' mean
square. ``potq/formats/apot.py`` uses the best set at each width; this script is how it was chosen.
"""

from __future__ import annotations

import argparse
import itertools
import math
import shlex
import sys
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

import potq
from potq.formats.apot import MAGNITUDES
from potq.models import transformer_blocks
from potq.paths import write_text_atomic

CANDIDATES = {2: (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32), 3: (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32),
              4: (1, 2, 3, 4, 5, 6, 8, 9, 10, 12, 16)}  # sums of at most two powers of two
CLIPS = torch.linspace(0.5, 1.0, 11)


def sampled_groups(model: torch.nn.Module, group: int, per_layer: int, seed: int) -> Tensor:
    """``per_layer`` random groups of ``group`` weights from every linear of every block."""
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for block in transformer_blocks(model):
        for module in block.modules():
            if isinstance(module, torch.nn.Linear) and module.in_features % group == 0:
                w = module.weight.detach().float().reshape(-1, group)
                parts.append(w[torch.randperm(w.shape[0], generator=gen)[:per_layer]])
    return torch.cat(parts)


def symmetric_error(w: Tensor, magnitudes: tuple[float, ...]) -> float:
    """Mean squared error of ``w`` [groups, G] on ``±a·m/max(m)``, each group at its best clip."""
    m = torch.tensor(sorted(set(magnitudes)), dtype=torch.float32)
    levels = torch.cat([-m.flip(0), m]).unique() / m.max()
    mids = (levels[1:] + levels[:-1]) / 2
    top = w.abs().amax(1, keepdim=True).clamp(min=1e-12)
    best = torch.full((w.shape[0],), float("inf"))
    for c in CLIPS:
        v = w / (top * c)
        best = torch.minimum(best, ((levels[torch.bucketize(v, mids)] - v) * top * c).pow(2).mean(1))
    return best.mean().item()


def uniform_error(w: Tensor, bits: int) -> float:
    """The same for the asymmetric uniform grid (scale and zero point per group)."""
    q = 2**bits - 1
    lo0, hi0 = w.amin(1, keepdim=True).clamp(max=0), w.amax(1, keepdim=True).clamp(min=0)
    best = torch.full((w.shape[0],), float("inf"))
    for c_hi in CLIPS:
        for c_lo in CLIPS:
            lo, hi = lo0 * c_lo, hi0 * c_hi
            s = ((hi - lo) / q).clamp(min=1e-12)
            z = torch.round(-lo / s)
            best = torch.minimum(best, (((torch.round(w / s) + z).clamp(0, q) - z) * s - w).pow(2).mean(1))
    return best.mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--per-layer", type=int, default=100, help="groups sampled from each linear")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top", type=int, default=3, help="best candidate sets listed per width")
    p.add_argument("--out", required=True, help="output path without extension (.md is written)")
    args = p.parse_args()
    w = sampled_groups(potq.load_model(args.model).model, args.group_size, args.per_layer, args.seed)
    power = w.pow(2).mean().item()
    rows = []
    for bits in (2, 3, 4):
        n = 2 ** (bits - 1)
        pot = tuple(2**j for j in range(n))
        rows.append((bits, "uniform (asymmetric, zero point)", "–", uniform_error(w, bits) / power))
        rows.append((bits, "PoT", str(pot), symmetric_error(w, pot) / power))
        sets = [s for s in itertools.combinations(CANDIDATES[bits], n) if math.gcd(*s) == 1]
        scored = sorted((symmetric_error(w, s) / power, s)
                        for s in tqdm(sets, desc=f"{bits}-bit sets", unit="set", file=sys.stderr))
        for rank, (err, s) in enumerate(scored[:args.top], 1):
            chosen = " (potq's apot)" if s == MAGNITUDES[bits] else ""
            rows.append((bits, f"APoT, #{rank} of {len(scored)}{chosen}", str(s), err))
        if MAGNITUDES[bits] not in [s for _, s in scored[:args.top]]:
            rows.append((bits, "APoT, potq's", str(MAGNITUDES[bits]), symmetric_error(w, MAGNITUDES[bits]) / power))
    this = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    lines = [f"# {args.model}: which magnitudes an additive-PoT grid should have", "", "```", this, "```", "",
             f"{len(w)} groups of {args.group_size} weights ({args.per_layer} from every linear of every block, "
             f"seed {args.seed}); each group at its best clipping ratio of {len(CLIPS)}. Error: mean squared "
             "error over the weights' mean square. Candidates: sets of integers from "
             + "; ".join(f"{b} bits {CANDIDATES[b]}" for b in CANDIDATES) + ".", "",
             "| bits | grid | magnitudes | relative squared error |", "| --- | --- | --- | --- |"]
    lines += [f"| {b} | {name} | {mags} | {err:.4f} |" for b, name, mags, err in rows]
    write_text_atomic(Path(args.out).with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
