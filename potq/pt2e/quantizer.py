"""A PT2E ``Quantizer`` that puts potq formats on weights (and, optionally, int8 on activations).

The seed's recipe ("PoT weights in LLMs", §4.2): export the model, *prepare* it (observers on the
tensors to quantize), *calibrate* on sample batches, *convert* the observers into quantize /
dequantize ops. Its quantizer is symmetric for weights and affine for activations, with PoT for
weights. Here:

* weights: :class:`PotqWeightObserver`, any potq format. At convert time it replaces itself by
  the weight's constant codes and one ``potq::dequantize`` op (the weight is quantized once, as
  PT2E's ``fold_quantize`` does for affine weights), with the scales potq's round-to-nearest picks;
* or weights as PT2E's own symmetric per-channel integers (:class:`TorchInt`, 2–32 bits: the
  seed's uniform rows, wider than potq's packed formats go);
* activations (``activations=True``): PT2E's own per-tensor affine int8 with a min/max observer,
  converted to ``quantized_decomposed`` quantize/dequantize pairs.

Which weights: the linears of the transformer blocks, as ``potq quantize``; with ``embeddings``
also the embedding tables and a head tied to the token table, as ``--quantize-embeddings``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from torch import Tensor, fx
from torchao.quantization.pt2e import MinMaxObserver, ObserverBase, PerChannelMinMaxObserver
from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, QuantizationSpec, Quantizer
from torchao.quantization.pt2e.utils import create_getattr_from_value

import potq.pt2e.ops  # noqa: F401  (registers torch.ops.potq.*)
from potq.config import QuantConfig
from potq.errors import PotqError
from potq.formats.weights import quantize_weight

_LINEAR, _EMBEDDING = torch.ops.aten.linear.default, torch.ops.aten.embedding.default


class PotqWeightObserver(ObserverBase):
    """Stands on a weight in the prepared graph; becomes codes + ``potq::dequantize`` on convert."""

    def __init__(self, config: QuantConfig, dtype: torch.dtype = torch.uint8, **kwargs: object) -> None:
        super().__init__(dtype=torch.uint8, is_dynamic=False)
        self.config = config

    def forward(self, x: Tensor) -> Tensor:
        return x

    def calculate_qparams(self) -> tuple[Tensor, Tensor]:  # PT2E's interface; convert() does the work
        raise NotImplementedError("potq weights are converted by PotqWeightObserver.convert")

    def convert(self, model: fx.GraphModule, observer_node: fx.Node) -> None:
        """Replace ``observer(weight)`` by ``potq::dequantize(codes, scales, zeros, …)``."""
        weight_node = observer_node.args[0]
        weight = model.get_parameter(weight_node.target) if weight_node.op == "get_attr" else None
        if weight is None:
            raise RuntimeError(f"potq observes constant weights only, got {weight_node.format_node()}")
        fmt = self.config.make_format()
        qw = quantize_weight(weight.detach(), fmt, self.config.group_size)
        graph = model.graph
        with graph.inserting_before(observer_node):
            codes = create_getattr_from_value(model, graph, "_potq_codes", qw.codes)
            scales = create_getattr_from_value(model, graph, "_potq_scales", qw.scale)
            zeros = None if qw.zero is None else create_getattr_from_value(model, graph, "_potq_zeros", qw.zero)
            args = (codes, scales, zeros, fmt.name, fmt.bits, self.config.group_size,
                    json.dumps(self.config.options, sort_keys=True))
            dequantized = graph.call_function(torch.ops.potq.dequantize.default, args)
        observer_node.replace_all_uses_with(dequantized)
        graph.erase_node(observer_node)


@dataclass(frozen=True)
class TorchInt:
    """PT2E's own weight quantization: symmetric integers ``[-2^(bits-1), 2^(bits-1) - 1]`` per
    output channel, scale from the channel's min/max (the seed's "normal quantization")."""

    bits: int

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 32:
            raise PotqError(f"PT2E integer weights take 2 to 32 bits, got {self.bits!r}")

    def spec(self) -> QuantizationSpec:
        dtype = torch.int8 if self.bits <= 8 else torch.int16 if self.bits <= 16 else torch.int32
        lo, hi = -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return QuantizationSpec(dtype=dtype, quant_min=lo, quant_max=hi, qscheme=torch.per_channel_symmetric,
                                ch_axis=0, observer_or_fake_quant_ctr=PerChannelMinMaxObserver.with_args(
                                    ch_axis=0, dtype=dtype, qscheme=torch.per_channel_symmetric,
                                    quant_min=lo, quant_max=hi))


def weight_spec(weights: QuantConfig | TorchInt) -> QuantizationSpec:
    """The spec of a potq format (:class:`PotqWeightObserver`) or of PT2E's integers."""
    if isinstance(weights, TorchInt):
        return weights.spec()
    return QuantizationSpec(dtype=torch.uint8, observer_or_fake_quant_ctr=PotqWeightObserver.with_args(config=weights))


def activation_spec() -> QuantizationSpec:
    """The seed's activations: affine 8-bit per tensor, range from calibration min/max."""
    return QuantizationSpec(dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_affine,
                            observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2**-12))


class PotqQuantizer(Quantizer):
    """Annotates ``aten.linear`` (and ``aten.embedding``) nodes whose weight is in ``weights``."""

    def __init__(self, config: QuantConfig | TorchInt, weights: set[str], activations: bool = False) -> None:
        super().__init__()
        self.weights = weights
        self.weight_spec = weight_spec(config)
        self.act_spec = activation_spec() if activations else None

    def annotate(self, model: fx.GraphModule) -> fx.GraphModule:
        for node in model.graph.nodes:
            if node.op != "call_function" or node.target not in (_LINEAR, _EMBEDDING):
                continue
            x, weight = (node.args[0], node.args[1]) if node.target == _LINEAR else (None, node.args[0])
            if weight.op != "get_attr" or weight.target not in self.weights:
                continue
            qspecs = {weight: self.weight_spec}
            if x is not None and self.act_spec is not None:
                qspecs[x] = self.act_spec
            node.meta["quantization_annotation"] = QuantizationAnnotation(input_qspec_map=qspecs, _annotated=True)
        return model

    def validate(self, model: fx.GraphModule) -> None:
        """Every annotation here is one PT2E supports; nothing further to check."""
