"""Which layers cost GPTQ its perplexity? GPTQ's model with chosen layers put back to
round-to-nearest, evaluated on the same windows as pure RTN and pure GPTQ.

GPTQ lowers almost every layer's output error below RTN's (docs/results/gptq-layer-error.md),
yet at uniform 4 bits in the plain column order ends above RTN in perplexity. If a few layers
carry that loss, taking their RTN weights into the GPTQ model closes the gap; if it is spread
thin, no small set does. The model is quantized once each way (GPTQ on potq's default
calibration, sequential through the blocks, in the plain order whose gap this studies unless
``--act-order``) and each hybrid is GPTQ's model with the RTN layers matching a pattern swapped in.

    python benchmarks/gptq_swap.py --model smollm2-135m --row uniform:4 --max-windows 40 \\
        --out docs/results/gptq-swap
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import re
import shlex
import sys

from torch import nn

from layer_bench import write_result

import potq
from potq.nn.packed import QuantLinear

# name -> regular expression over the linears' full names (LLaMA naming); "" takes none
SWAPS = {
    "gptq": "",
    "gptq, rtn down_proj of blocks 3-7": r"layers\.[3-7]\.mlp\.down_proj$",
    "gptq, rtn every down_proj": r"\.mlp\.down_proj$",
    "gptq, rtn blocks 0-7": r"layers\.[0-7]\.",
    "gptq, rtn blocks 8-29": r"layers\.([89]|[12][0-9])\.",
}


def hybrid(base: nn.Module, donor: nn.Module, pattern: str) -> tuple[nn.Module, int]:
    """A copy of ``base`` whose quantized linears matching ``pattern`` are ``donor``'s."""
    model = copy.deepcopy(base)
    names = [n for n, m in donor.named_modules() if isinstance(m, QuantLinear) and pattern
             and re.search(pattern, n)]
    for name in names:
        model.set_submodule(name, copy.deepcopy(donor.get_submodule(name)))
    return model, len(names)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--row", default="uniform:4", help="FORMAT:BITS, G128")
    p.add_argument("--dataset", default="wikitext2")
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=False,
                   help="GPTQ with act-order (default: the plain order)")
    p.add_argument("--out", required=True, help="output path without suffix: writes .json and .md")
    args = p.parse_args()
    command = "python benchmarks/gptq_swap.py " + shlex.join(sys.argv[1:])

    fmt_name, bits = args.row.split(":")
    config = potq.QuantConfig(fmt_name, int(bits), 128)
    lm = potq.load_model(args.model)
    quantized = {}
    for method in ("rtn", "gptq"):
        copied = dataclasses.replace(lm, model=copy.deepcopy(lm.model))
        settings = {"act_order": args.act_order} if method == "gptq" else {}
        quantized[method] = potq.quantize_(copied, config, method=method, **settings)

    def ppl(model: nn.Module) -> float:
        return potq.eval.perplexity(model, lm.tokenizer, args.dataset, ctx=args.ctx,
                                    max_windows=args.max_windows).ppl

    records = [{"model": "rtn", "rtn layers": len([m for m in quantized["rtn"].modules()
                                                   if isinstance(m, QuantLinear)]),
                "ppl": ppl(quantized["rtn"])}]
    for name, pattern in SWAPS.items():
        model, swapped = hybrid(quantized["gptq"], quantized["rtn"], pattern)
        records.append({"model": name, "rtn layers": swapped, "ppl": ppl(model)})
        print(records[-1], flush=True)

    lines = [f"# GPTQ with layers put back to round-to-nearest ({args.model}, {args.row}, G128)", "",
             f"{args.dataset} perplexity on the first {args.max_windows} windows of {args.ctx} tokens, all rows "
             "on the same windows; GPTQ on potq's default calibration (32×512 tokens).", "",
             "```", command, "```", "",
             "| model | layers from RTN | perplexity |", "| --- | --- | --- |"]
    lines += [f"| {r['model']} | {r['rtn layers']} | {r['ppl']:.3f} |" for r in records]
    write_result(args.out, {"command": command, "records": records}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
