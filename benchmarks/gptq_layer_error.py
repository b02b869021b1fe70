"""GPTQ against round-to-nearest, layer by layer: does GPTQ's lower output error on its own
calibration batch carry over to text it did not see?

Every linear of the float model is quantized twice — RTN, and GPTQ with the Hessian of a C4
calibration batch (potq's default 32×512, seed 0), in the plain column order unless
``--act-order`` (this study predates act-order becoming potq's default) — and each weight's relative output error
``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` is measured under three input Hessians: the calibration batch
itself, a second C4 batch (seed 1, held out) and the start of the WikiText-2 test text (the
evaluation text). Every layer sees the float model's inputs, so layers are compared on the same
footing (the method itself feeds each block the already quantized earlier blocks).

    python benchmarks/gptq_layer_error.py --model smollm2-135m --rows uniform:4 uniform:3 pot:3 \\
        --out docs/results/gptq-layer-error
"""

from __future__ import annotations

import argparse
import shlex
import sys

import torch
from torch import Tensor
from tqdm import tqdm

from layer_bench import add_calibration_args, write_result

import potq
from potq.engine.blocks import BlockData, block_linears, capture_inputs, input_hessians, outputs
from potq.eval.data import calibration_batch, eval_text
from potq.formats.weights import quantize_weight
from potq.methods.gptq import gptq_weight
from potq.models import transformer_blocks

SETS = ("calibration", "c4 held out", "wikitext2 test")


def relative_error(w: Tensor, q: Tensor, hessian: Tensor) -> float:
    """Output error of ``q`` in place of ``w`` on inputs with second moment ``hessian``, relative
    to the output's own size."""
    d = q - w
    return float(torch.einsum("oi,ij,oj->", d, hessian, d) / torch.einsum("oi,ij,oj->", w, hessian, w))


def measure(lm: potq.LoadedModel, rows: list[str], group_size: int, batches: list[Tensor],
            act_order: bool) -> list[dict]:
    """One record per (format, layer): RTN's and GPTQ's relative error under each batch's Hessian."""
    streams = [capture_inputs(lm.model, ids, batch_size=8) for ids in batches]
    records = []
    for index, block in enumerate(tqdm(transformer_blocks(lm.model), desc="blocks", unit="block")):
        hessians = [input_hessians(block, data) for data in streams]
        for name, module in block_linears(block).items():
            w = module.weight.detach().float()
            for spec in rows:
                fmt_name, bits = spec.split(":")
                fmt = potq.QuantConfig(fmt_name, int(bits), group_size).make_format()
                q = {"rtn": quantize_weight(w, fmt, group_size).dequantize(),
                     "gptq": gptq_weight(w, hessians[0][name], fmt, group_size, act_order=act_order).dequantize()}
                records.append({"format": spec, "block": index, "layer": name,
                                **{f"{method} {s}": relative_error(w, q[method], h[name])
                                   for method in q for s, h in zip(SETS, hessians)}})
        streams = [BlockData(outputs(block, data), data.kwargs) for data in streams]
    return records


def markdown(records: list[dict], rows: list[str], command: str, setup: str) -> str:
    lines = ["| format | inputs | RTN mean error | GPTQ mean error | layers where GPTQ is lower |",
             "| --- | --- | --- | --- | --- |"]
    for spec in rows:
        mine = [r for r in records if r["format"] == spec]
        for s in SETS:
            rtn = sum(r[f"rtn {s}"] for r in mine) / len(mine)
            gptq = sum(r[f"gptq {s}"] for r in mine) / len(mine)
            wins = sum(r[f"gptq {s}"] < r[f"rtn {s}"] for r in mine)
            lines.append(f"| {spec} | {s} | {rtn:.4g} | {gptq:.4g} | {wins} of {len(mine)} |")
    return "\n".join([f"# GPTQ vs round-to-nearest, layer by layer ({setup})", "",
                      "Relative output error tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) of every linear, each fed the float "
                      "model's inputs; GPTQ uses the calibration batch's Hessian. Per-layer values in the "
                      "JSON beside this file.", "", "```", command, "```", "", *lines, ""])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rows", nargs="+", default=["uniform:4", "uniform:3", "pot:3"])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=False,
                   help="GPTQ with act-order (default: the plain order)")
    add_calibration_args(p)
    args = p.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    lm = potq.load_model(args.model)
    n, length = args.calib_samples, args.calib_len
    wiki = lm.tokenizer.encode(eval_text("wikitext2")[:40 * n * length], bos=False)[:n * length]
    batches = [calibration_batch(lm.tokenizer, n, length, seed=0), calibration_batch(lm.tokenizer, n, length, seed=1),
               torch.tensor(wiki).view(n, length)]
    with torch.no_grad():
        records = measure(lm, args.rows, args.group_size, batches, args.act_order)
    setup = f"{args.model}, G{args.group_size}, batches of {n}×{length}"
    write_result(args.out, {"command": command, "records": records}, markdown(records, args.rows, command, setup))


if __name__ == "__main__":
    main()
