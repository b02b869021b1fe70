"""A block-wise method's settings, compared on the first blocks of a model: each block's output
MSE on the calibration batch at the method's start (epoch 0) and at the epoch it keeps, from the
same calibration batch. Cheap next to a full perplexity row, so settings are chosen with it.

Step 2's gradient through the scale (thesis eq. 3.16 taken literally, ``grad=ste``, against codes
held constant in the backward pass, ``grad=detach``), from the same Step 1 start:

    python benchmarks/block_loss.py --model smollm2-135m --method twostep --rows pot:3 pot-zero:3 pot:2 \\
        --settings grad=ste grad=detach --blocks 3 --epochs 10 --out docs/results/step2-grad

OmniQuant's learnable clipping adapted to PoT, potq's defaults against OmniQuant's own schedule:

    python benchmarks/block_loss.py --model smollm2-135m --method omniquant --rows pot:3 \\
        --settings grad=ste grad=detach grad=ste,epochs=20,lr=0.01,batch_size=1 \\
        grad=detach,epochs=20,lr=0.01,batch_size=1 --blocks 3 --out docs/results/lwc-settings

Block-AP's latent-weight learning rate, against two-step on the same blocks; ``--heldout`` also
measures each block's output error on calibration windows drawn with another seed, which the
method never saw (training weights can fit the calibration batch without generalizing):

    python benchmarks/block_loss.py --model smollm2-135m --method blockap --rows pot:3 --group-size 64 \
        --settings weight_lr=0.0001 weight_lr=0.0003 weight_lr=0.001 --blocks 3 --heldout 8 \
        --out docs/results/blockap-lr

A setting is ``key=value[,key=value...]`` passed to the method; ``--epochs`` applies unless a
setting names its own, ``--objective`` (Step 1's error) only to twostep.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys

from layer_bench import add_calibration_args, write_result
from ppl_table import parse_settings

import potq
from potq.engine.blocks import BlockData, block_kwargs, capture_inputs, outputs
from potq.eval.data import calibration_batch
from potq.methods import get_method
from potq.models import transformer_blocks
from potq.quantize import quantizable_layers


def first_blocks(model, count: int):
    """A copy of ``model`` cut after its first ``count`` blocks."""
    model = copy.deepcopy(model)
    del transformer_blocks(model)[count:]
    model.config.num_hidden_layers = count  # what the block finder counts on
    return model


def heldout_errors(float_model, quantized, ids) -> list[float]:
    """Each block's output MSE on ``ids`` against the float block on the same inputs, along the
    quantized model's own stream (what the method minimised, on text it did not see)."""
    data = capture_inputs(quantized, ids, 4)
    kwargs_of = block_kwargs(quantized, ids.split(4)[-1])
    errors = []
    for reference, block, kwargs in zip(transformer_blocks(float_model), transformer_blocks(quantized), kwargs_of):
        data = BlockData(data.inputs, kwargs)
        got, wanted = outputs(block, data), outputs(reference, data)
        errors.append(sum(((g - w) ** 2).mean().item() for g, w in zip(got, wanted)) / len(got))
        data = BlockData(got, kwargs)
    return errors


def run(lm: potq.LoadedModel, spec: str, setting: str, args: argparse.Namespace, calibration, heldout) -> list[dict]:
    fmt, bits = spec.split(":")
    reference = first_blocks(lm.model, args.blocks)
    model = copy.deepcopy(reference)
    config = potq.QuantConfig(fmt, int(bits), args.group_size)
    kwargs = {"epochs": args.epochs, **({"objective": args.objective} if args.method == "twostep" else {}),
              **parse_settings(setting.split(","))}
    get_method(args.method).run(model, quantizable_layers(model), config, calibration, progress=False, **kwargs)
    unseen = heldout_errors(reference, model, heldout) if heldout is not None else [None] * args.blocks
    rows = []
    for r, other in zip(model.potq_report["blocks"], unseen):
        start, kept = r["loss"][0], r["kept"]
        rows.append({"format": spec, "setting": setting, "block": r["block"], "start": start, "kept": kept,
                     "change_pct": 100 * (kept - start) / start, "seconds": r["seconds"], "loss": r["loss"],
                     "heldout": other})
        print(f"{spec} {setting} block {r['block']}: {start:.4g} -> {kept:.4g} "
              f"({rows[-1]['change_pct']:+.1f} %, {r['seconds']:.0f} s)"
              + ("" if other is None else f", held out {other:.4g}"), flush=True)
    return rows


def markdown(rows: list[dict], args: argparse.Namespace, command: str) -> str:
    held = args.heldout > 0
    extra = " held-out MSE |" if held else ""
    lines = [f"| format | setting | block | output MSE at start | kept | change |{extra} seconds |",
             "| --- | --- | --- | --- | --- | --- |" + (" --- |" if held else "") + " --- |"]
    lines += [f"| {r['format']} | {r['setting']} | {r['block']} | {r['start']:.4g} | {r['kept']:.4g} | "
              f"{r['change_pct']:+.1f} % |" + (f" {r['heldout']:.4g} |" if held else "") + f" {r['seconds']:.0f} |"
              for r in rows]
    summary = [f"| format | setting | mean change over blocks | mean MSE kept |{' mean held-out MSE |' if held else ''}"
               " seconds |", "| --- | --- | --- | --- |" + (" --- |" if held else "") + " --- |"]
    for spec in args.rows:
        for setting in args.settings:
            mine = [r for r in rows if r["format"] == spec and r["setting"] == setting]
            mean_held = f" {sum(r['heldout'] for r in mine) / len(mine):.4g} |" if held else ""
            summary.append(f"| {spec} | {setting} | {sum(r['change_pct'] for r in mine) / len(mine):+.1f} % | "
                           f"{sum(r['kept'] for r in mine) / len(mine):.4g} |{mean_held} "
                           f"{sum(r['seconds'] for r in mine):.0f} |")
    start = (f"Step 1 objective {args.objective}" if args.method == "twostep" else "start: the method's own")
    return "\n".join([
        f"# {args.method}: block output error by setting ({args.model}, first {args.blocks} blocks, "
        f"G{args.group_size}, {args.epochs} epochs unless set, calibration {args.calib_samples}×{args.calib_len}, "
        f"{start})", "",
        "Block output MSE on the calibration batch; the method keeps its best epoch, so it never ends above "
        "its start." + (f" Held out: the same error on {args.heldout} calibration windows of seed 1, "
                        "which the method never saw." if args.heldout else ""), "", "```", command, "```", "", *summary, "", *lines, ""])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="twostep", help="a block-wise method: twostep, finetune, omniquant")
    p.add_argument("--rows", nargs="+", default=["pot:3", "pot-zero:3", "pot:2"])
    p.add_argument("--settings", nargs="+", default=["grad=ste", "grad=detach"])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--blocks", type=int, default=3)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--objective", choices=("mse", "act"), default="mse", help="twostep's Step 1 error (the start)")
    p.add_argument("--heldout", type=int, default=0,
                   help="also measure on this many calibration windows of seed 1 (not trained on)")
    add_calibration_args(p)
    args = p.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    lm = potq.load_model(args.model)
    calibration = calibration_batch(lm.tokenizer, args.calib_samples, args.calib_len, seed=0)
    heldout = calibration_batch(lm.tokenizer, args.heldout, args.calib_len, seed=1) if args.heldout else None
    rows = [r for spec in args.rows for setting in args.settings
            for r in run(lm, spec, setting, args, calibration, heldout)]
    write_result(args.out, {"command": command, "rows": rows}, markdown(rows, args, command))


if __name__ == "__main__":
    main()
