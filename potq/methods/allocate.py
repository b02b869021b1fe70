"""Mixed precision under a bit budget (``--bpw B``): how many bits each linear gets.

llama.cpp's k-quant mixes spend more bits on the tensors that matter; here "matter" is
measured. For every linear and every width it could get (the format's 2, 3 and 4 bits, and an
8-bit layer — the same format's for uniform, symmetric int8 for PoT, whose 8-bit grid would
only add tiny exponents), the cost is the layer's activation-weighted rounding error
``Σ_rows Σ_cols E[x_col²]·(w − q(w))²`` with Step 1's activation-weighted scale search (on a
coarser grid of multipliers) — the
increase in the layer's output error, with ``E[x²]`` (GPTQ's Hessian diagonal) measured on the
calibration text through the float model. A greedy allocation then starts every layer at the
narrowest width and repeatedly buys the upgrade that removes the most error per bit spent,
while the whole model's bits per weight (codes, scales and zero points of every layer) stay
within ``B``. The chosen widths are recorded per layer in potq.json, which storage, the
kernels and ``potq info`` read layer by layer.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm import tqdm

from potq import devices
from potq.config import QuantConfig
from potq.errors import PotqError
from potq.formats import Format
from potq.methods.grid import MULTIPLIERS, search_scales
from potq.formats.weights import fake_quantize

WIDTHS = (2, 3, 4, 8)
# the sensitivity's scale search: every fifth multiplier of Step 1's grid (a layer's error at a width
# is a ranking signal here; the quantizer stage searches the full grid for the width chosen)
COARSE = MULTIPLIERS[4::5]


def candidates(config: QuantConfig) -> list[QuantConfig]:
    """The widths a layer of ``config``'s format can get, narrowest first."""
    options = []
    for bits in WIDTHS:
        fmt = config.format
        if bits == 8 and fmt.startswith(("pot", "apot")):  # a sign-magnitude grid's 8 bits: int8's are better
            fmt = "uniform-sym"
        try:
            options.append(QuantConfig(fmt, bits, config.group_size, config.options if fmt == config.format else {}))
        except PotqError:  # a width the format does not have
            continue
    return options


def cost(fmt: Format, group_size: int, shape: tuple[int, int]) -> float:
    """Bits a layer of ``shape`` takes in ``fmt`` as stored: codes, fp16 scales and zero points."""
    return 8.0 * fmt.stored_bytes(shape[0], shape[1], group_size)


def input_moments(model: nn.Module, layers: dict[str, nn.Linear], calibration: Tensor,
                  batch_size: int = 4) -> dict[str, Tensor]:
    """E[x²] per input column of every linear, through the float model on ``calibration``."""
    sums: dict[str, Tensor] = {}
    count = 0

    def hook(name: str):
        def record(_m: nn.Module, args: tuple, _out: Tensor) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name] = x.pow(2).sum(0) + sums.get(name, 0)
        return record

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    try:
        with torch.no_grad():
            for batch in calibration.split(batch_size):
                model(batch.to(devices.of(model)), use_cache=False)
                count += batch.numel()
    finally:
        for h in handles:
            h.remove()
    return {name: s / count for name, s in sums.items()}


@dataclass
class Allocation:
    """Each layer's chosen width, and the bits per weight the choice costs."""

    configs: dict[str, QuantConfig]
    bpw: float
    errors: dict[str, dict[str, float]]  # layer -> {format label: weighted rounding error}

    def labels(self) -> dict[str, str]:
        return {name: f"{c.format}{c.bits}" for name, c in self.configs.items()}


def allocate(model: nn.Module, layers: dict[str, nn.Linear], config: QuantConfig, calibration: Tensor,
             bpw: float, progress: bool = True) -> Allocation:
    """The widths that minimise the summed weighted rounding error within ``bpw`` bits per weight."""
    options = candidates(config)
    shapes = {name: tuple(layer.weight.shape) for name, layer in layers.items()}
    total = sum(o * i for o, i in shapes.values())
    floor = sum(cost(options[0].make_format(), config.group_size, s) for s in shapes.values()) / total
    if bpw < floor - 1e-9:
        raise PotqError(f"--bpw {bpw} is below {floor:.3f}, the narrowest {options[0].format} "
                        f"{options[0].bits}-bit at G{config.group_size} this model can take")
    moments = input_moments(model, layers, calibration)
    errors: dict[str, list[float]] = {}
    for name in tqdm(layers, desc="sensitivity", unit="layer", disable=not progress):
        w = devices.to_current(layers[name].weight.detach().float())
        weight = moments[name].to(w.device)
        errors[name] = []
        for option in options:
            fmt = option.make_format()
            qp = search_scales(w, fmt, config.group_size, COARSE, column_weight=weight)[0]
            diff = fake_quantize(w, fmt, config.group_size, qp) - w
            errors[name].append(float((diff.pow(2) * weight).sum()))
    chosen = {name: 0 for name in layers}
    spent = floor * total
    budget = bpw * total
    bits = {name: [cost(o.make_format(), config.group_size, shapes[name]) for o in options] for name in layers}
    while True:
        best, gain = None, 0.0
        for name, i in chosen.items():
            for j in range(i + 1, len(options)):
                extra = bits[name][j] - bits[name][i]
                if spent + extra <= budget and (errors[name][i] - errors[name][j]) / extra > gain:
                    best, gain = (name, j), (errors[name][i] - errors[name][j]) / extra
        if best is None:
            break
        name, j = best
        spent += bits[name][j] - bits[name][chosen[name]]
        chosen[name] = j
    configs = {name: options[i] for name, i in chosen.items()}
    if progress:
        counts: dict[str, int] = {}
        for c in configs.values():
            counts[f"{c.format}{c.bits}"] = counts.get(f"{c.format}{c.bits}", 0) + 1
        tqdm.write(f"bit budget {bpw}: {spent / total:.3f} bits/weight, layers "
                   + ", ".join(f"{k} ×{v}" for k, v in counts.items()), file=sys.stderr)
    labels = [f"{o.format}{o.bits}" for o in options]
    return Allocation(configs, spent / total, {n: dict(zip(labels, e)) for n, e in errors.items()})
