"""The PyTorch 2 export (PT2E) quantization flow with potq formats ("PoT weights in LLMs", §4).

    gm = quantize_pt2e(lm, QuantConfig("pot-seed", 5, -1), embeddings=True, calibration=batches)
    logits = gm(ids)

``torch.export`` turns the model into an ATen graph, torchao's ``prepare_pt2e`` inserts the
observers :class:`~potq.pt2e.quantizer.PotqQuantizer` asks for, the calibration batches run
through it, and ``convert_pt2e`` turns the observers into quantize/dequantize ops — potq's
custom ``potq::dequantize`` for weights (:mod:`potq.pt2e.ops`). The converted graph module
computes the same logits as ``potq.quantize_`` with ``rtn`` on the same weights (tested).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import Tensor, fx, nn
from torch.export import Dim

from potq.config import QuantConfig
from potq.errors import PotqError, first_line
from potq.eval.perplexity import max_positions
from potq.models import LoadedModel
from potq.nn import PackedWeight
from potq.pt2e.quantizer import PotqQuantizer, TorchInt
from potq.quantize import embedding_tables, quantizable_layers

_WRAPPED = "model"  # the attribute the wrapper keeps the model under: a prefix of every weight name


class LogitsOnly(nn.Module):
    """``ids -> logits`` without a KV cache: the one signature ``torch.export`` traces."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        setattr(self, _WRAPPED, model)

    def forward(self, ids: Tensor) -> Tensor:
        return getattr(self, _WRAPPED)(input_ids=ids, use_cache=False).logits


def export(model: nn.Module) -> fx.GraphModule:
    """The model as an ATen graph module, batch and sequence length left dynamic."""
    limit = max_positions(model) or 4096
    example = torch.zeros(2, min(8, limit), dtype=torch.long)  # size 1 would be specialised
    dims = {"ids": {0: Dim("batch", max=1024), 1: Dim("seq", min=2, max=limit)}}
    try:
        with torch.no_grad():
            program = torch.export.export(LogitsOnly(model).eval(), (example,), dynamic_shapes=dims)
    except Exception as exc:  # torch.export raises many types; all mean "this model does not trace"
        raise PotqError(f"torch.export could not trace {type(model).__name__} ({first_line(exc)}); "
                        "PT2E supports the LLaMA and GPT-2 models potq loads") from None
    return program.module()


def weight_names(model: nn.Module, embeddings: bool) -> set[str]:
    """Names of the weights to quantize, as the exported graph's ``get_attr`` nodes call them.

    A tied weight has several names and the export keeps any one of them (GPT-2's token table
    comes out as ``lm_head.weight``), so every name of a chosen tensor is included.
    """
    layers = {**quantizable_layers(model), **(embedding_tables(model) if embeddings else {})}
    chosen = {id(layer.weight) for layer in layers.values()}
    return {f"{_WRAPPED}.{name}" for name, p in model.named_parameters(remove_duplicate=False) if id(p) in chosen}


def quantize_pt2e(lm: LoadedModel | nn.Module, config: QuantConfig | TorchInt, embeddings: bool = False,
                  activations: bool = False, calibration: list[Tensor] | None = None) -> fx.GraphModule:
    """Export, prepare, calibrate and convert ``lm``; the converted graph module (ids -> logits).

    ``config`` is a potq format or :class:`TorchInt` (PT2E's own integers, up to 32 bits).
    ``calibration`` batches (``[batch, seq]`` ids) set the activation ranges when ``activations``;
    weights need no data, so without activations one example forward is enough.
    """
    from torchao.quantization.pt2e import allow_exported_model_train_eval, move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    model = lm.model if isinstance(lm, LoadedModel) else lm
    if any(isinstance(m, PackedWeight) for m in model.modules()):
        raise PotqError("PT2E quantizes a float model: load the float model, not a quantized potq folder")
    if activations and not calibration:
        raise PotqError("int8 activations need calibration batches to set their ranges")
    graph = export(model)
    prepared = prepare_pt2e(graph, PotqQuantizer(config, weight_names(model, embeddings), activations))
    with torch.no_grad():
        for batch in calibration or [torch.zeros(1, 8, dtype=torch.long)]:
            prepared(batch)
    converted = move_exported_model_to_eval(convert_pt2e(prepared))
    return allow_exported_model_train_eval(converted)  # so evaluation code may call .eval() on it


def graph_summary(gm: fx.GraphModule) -> str:
    """How many of each quantization op the converted graph holds, and the first quantized
    linear with everything feeding its weight and input (the seed's Figure 4)."""
    ops = Counter(str(n.target) for n in gm.graph.nodes
                  if n.op == "call_function" and ("potq" in str(n.target) or "quantized_decomposed" in str(n.target)
                                                  or n.target == torch.ops.aten.linear.default))
    lines = [f"{count:5d} x {op}" for op, count in sorted(ops.items())]
    first = next((n for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default
                  and "dequantize" in str(getattr(n.args[1], "target", ""))), None)
    if first is not None:
        feeding, todo = [], [first]
        while todo:
            node = todo.pop()
            feeding.append(node)
            todo += [a for a in node.all_input_nodes if a.op == "get_attr" or "quant" in str(a.target)]
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        lines += ["", "first quantized linear:"] + [f"  {n.format_node()}" for n in sorted(feeding, key=order.get)]
    return "\n".join(lines)
