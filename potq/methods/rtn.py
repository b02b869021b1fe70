"""Round-to-nearest: the scale spans each group's range, every weight goes to its nearest level."""

from __future__ import annotations

from torch import nn
from tqdm import tqdm

from potq import devices
from potq.config import QuantConfig
from potq.formats.weights import QuantizedWeight, quantize_weight


def quantize(model: nn.Module, layers: dict[str, nn.Linear], config: QuantConfig,
             progress: bool = True) -> dict[str, QuantizedWeight]:
    """Quantize each layer on its own, with the format's default (max-based) scale."""
    fmt = config.make_format()
    return {name: quantize_weight(devices.to_current(layer.weight.detach()), fmt, config.group_size).to(devices.CPU)
            for name, layer in tqdm(layers.items(), desc=f"rtn {fmt!r}", unit="layer", disable=not progress)}
