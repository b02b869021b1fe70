"""Step 1 of the two-step PoT method: a data-agnostic grid search of each group's scale.

For every group, try the scale multipliers ``b ∈ {0.01, 0.02, …, 2.00}`` (thesis Algorithm 1,
eq. 3.11–3.12) on top of the round-to-nearest scale and keep the ``b`` with the smallest squared
error of the group. All groups of a layer are searched at once; the multipliers are processed in
chunks so that memory stays at ``chunk × weights`` floats. The search goes through
``Format.init_qparams(clip=b)``, so it works for every format, uniform included (there it is the
usual clipping-ratio search).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from tqdm import tqdm

from potq.config import QuantConfig
from potq.formats import Format, QParams
from potq.formats.grouping import PER_TENSOR, to_groups
from potq.formats.weights import QuantizedWeight, init_qparams, quantize_weight

MULTIPLIERS = torch.arange(1, 201, dtype=torch.float32) / 100  # the thesis' b grid


def group_errors(w: Tensor, fmt: Format, group_size: int, multipliers: Tensor,
                 column_weight: Tensor | None = None, chunk: int = 16) -> Tensor:
    """Squared error of every group under every multiplier, ``[len(multipliers), rows, groups]``.

    ``column_weight`` (``[in]``) weighs each input column's squared error (ones by default);
    the zero padding of a ragged last group always gets weight 0, so it never counts.
    """
    wg = to_groups(w.float(), group_size)
    ones = torch.ones(w.shape[1]) if column_weight is None else column_weight.float()
    weight = to_groups(ones[None], group_size)  # [1, groups, G], zeros on the padding
    errors = []
    for bs in multipliers.split(chunk):
        qp = fmt.init_qparams(wg.unsqueeze(0), bs.view(-1, 1, 1))  # [chunk, rows, groups]
        deq = fmt.fake_quant(wg.unsqueeze(0), qp)
        errors.append(((deq - wg) ** 2 * weight).sum(-1))
    return torch.cat(errors)


def search_scales(w: Tensor, fmt: Format, group_size: int, multipliers: Tensor = MULTIPLIERS,
                  column_weight: Tensor | None = None) -> tuple[QParams, Tensor]:
    """The best parameters of every group and the chosen multiplier ``b*`` ``[rows, groups]``."""
    if group_size == PER_TENSOR:
        raise ValueError("the grid search is per group; use a group size or -1 (per channel)")
    errors = group_errors(w, fmt, group_size, multipliers, column_weight)
    best = multipliers[errors.argmin(dim=0)]  # first minimum on ties: the smaller b
    return init_qparams(w, fmt, group_size, clip=best), best


def quantize(model: nn.Module, layers: dict[str, nn.Linear], config: QuantConfig,
             progress: bool = True) -> dict[str, QuantizedWeight]:
    """Every layer with its grid-searched group scales (thesis Step 1)."""
    fmt = config.make_format()
    result = {}
    for name, layer in tqdm(layers.items(), desc=f"grid {fmt!r}", unit="layer", disable=not progress):
        w = layer.weight.detach()
        qp, _ = search_scales(w, fmt, config.group_size)
        result[name] = quantize_weight(w, fmt, config.group_size, qp)
    return result
