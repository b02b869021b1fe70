"""Step 2's gradient through the scale, measured: ``--grad ste`` (thesis eq. 3.16 taken
literally) against ``--grad detach`` (codes held constant in the backward pass), on the first
blocks of a model, from the same Step 1 start (``--objective``, default the thesis' plain ``mse``)
and the same calibration batch.

    python benchmarks/step2_grad.py --model smollm2-135m --rows pot:3 pot-zero:3 pot:2 \
        --blocks 3 --epochs 10 --out docs/results/step2-grad

Reports each block's output MSE after Step 1 (epoch 0) and after Step 2 (the best epoch kept).
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
from pathlib import Path

import potq
from potq.eval.data import calibration_batch
from potq.methods import twostep
from potq.models import transformer_blocks
from potq.quantize import quantizable_layers


def run(lm: potq.LoadedModel, spec: str, grad: str, args: argparse.Namespace, calibration) -> list[dict]:
    fmt, bits = spec.split(":")
    model = copy.deepcopy(lm.model)
    del transformer_blocks(model)[args.blocks:]
    config = potq.QuantConfig(fmt, int(bits), args.group_size)
    twostep.quantize(model, quantizable_layers(model), config, calibration, epochs=args.epochs, grad=grad,
                     objective=args.objective, progress=False)
    rows = []
    for r in model.potq_report["blocks"]:
        start, kept = r["loss"][0], r["kept"]
        rows.append({"format": spec, "grad": grad, "block": r["block"], "step1": start, "step2": kept,
                     "change_pct": 100 * (kept - start) / start, "seconds": r["seconds"], "loss": r["loss"]})
        print(f"{spec} {grad} block {r['block']}: {start:.4g} -> {kept:.4g} "
              f"({rows[-1]['change_pct']:+.1f} %, {r['seconds']:.0f} s)", flush=True)
    return rows


def markdown(rows: list[dict], args: argparse.Namespace, command: str) -> str:
    lines = ["| format | grad | block | output MSE after Step 1 | after Step 2 | change | seconds |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['format']} | {r['grad']} | {r['block']} | {r['step1']:.4g} | {r['step2']:.4g} | "
              f"{r['change_pct']:+.1f} % | {r['seconds']:.0f} |" for r in rows]
    summary = ["| format | grad | mean change over blocks |", "| --- | --- | --- |"]
    for spec in args.rows:
        for grad in twostep.GRADS:
            mine = [r["change_pct"] for r in rows if r["format"] == spec and r["grad"] == grad]
            summary.append(f"| {spec} | {grad} | {sum(mine) / len(mine):+.1f} % |")
    return "\n".join([
        f"# Step 2 gradient: ste vs detach ({args.model}, first {args.blocks} blocks, G{args.group_size}, "
        f"{args.epochs} epochs, calibration {args.calib_samples}×{args.calib_len}, Step 1 objective "
        f"{args.objective})", "",
        "Block output MSE on the calibration batch; Step 2 keeps its best epoch, so it never ends above "
        "Step 1.", "", "```", command, "```", "", *summary, "", *lines, ""])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rows", nargs="+", default=["pot:3", "pot-zero:3", "pot:2"])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--blocks", type=int, default=3)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--objective", choices=("mse", "act"), default="mse", help="Step 1's error (the start)")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    lm = potq.load_model(args.model)
    calibration = calibration_batch(lm.tokenizer, args.calib_samples, args.calib_len, seed=0)
    rows = [r for spec in args.rows for grad in twostep.GRADS for r in run(lm, spec, grad, args, calibration)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(markdown(rows, args, command))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
