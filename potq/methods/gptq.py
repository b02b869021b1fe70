"""GPTQ (Frantar et al., 2023) for any format: quantize a layer column by column and push each
column's rounding error onto the columns not yet quantized, weighted by the inverse Hessian of
the layer's squared output error, ``H = 2·E[x xᵀ]`` over the calibration inputs.

The loop is the reference one — Cholesky factor of ``H⁻¹`` (dampened by 1 % of the mean
diagonal), lazy batches of 128 columns, act-order (on by default, unlike the reference: on
SmolLM2 it lowered perplexity at every width and grid measured, see the README) — and rounds through
``Format.fake_quant``, so with ``--format pot`` it is the PoT-adapted GPTQ (the thesis'
GPTQ_POT) without a line of its own. With act-order the columns are visited out of order, so the
groups (whose layout storage fixes) take their parameters from the original weights up front
("static groups"). In the plain order (``act_order=False``) a group's parameters are set when the
loop reaches its first column, from the weights as the error feedback has left them, unless
``static_groups=True``: that pair tells the effect of the order from that of the group parameters.

Layers are taken block by block through :mod:`potq.engine.blocks`, so every layer's ``H`` comes
from inputs that already went through the quantized blocks before it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from potq.config import QuantConfig
from potq.engine.blocks import BlockData, block_linears, commit, input_hessians, run_blockwise
from potq.errors import PotqError
from potq.formats import Format
from potq.formats.grouping import group_width
from potq.formats.weights import QuantizedWeight, init_qparams, quantize_weight


def gptq_weight(w: Tensor, hessian: Tensor, fmt: Format, group_size: int, block_size: int = 128,
                damp: float = 0.01, act_order: bool = True, static_groups: bool = False) -> QuantizedWeight:
    """One ``[out, in]`` weight quantized by GPTQ against ``hessian`` ``[in, in]``."""
    W = w.detach().float().clone()
    H = hessian.detach().float().clone()
    rows, cols = W.shape
    dead = H.diagonal() == 0  # inputs that never fire: their weights cannot matter
    H[dead, dead] = 1
    W[:, dead] = 0
    width = group_width(cols, group_size)
    static_groups = static_groups or act_order
    qp = fmt.as_stored(init_qparams(W, fmt, group_size))  # kept as is only with static groups
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(cols, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(damp * H.diagonal().mean())
    try:
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError:
        raise PotqError("GPTQ: the layer's Hessian is not positive definite; use more calibration "
                        "data or a larger dampening (damp=...)") from None
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, err_block = W[:, i1:i2].clone(), torch.zeros(rows, i2 - i1, device=W.device)
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g = col // width
            if not static_groups and col % width == 0:  # a new group: parameters from the current weights
                current = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :width]
                fresh = fmt.as_stored(init_qparams(current, fmt, -1))
                qp.scale[:, g] = fresh.scale[:, 0]
                if qp.zero is not None:
                    qp.zero[:, g] = fresh.zero[:, 0]
            column = W1[:, i]
            q = fmt.fake_quant(column.view(rows, 1, 1), qp.map(lambda t: t[:, g:g + 1])).view(rows)
            Q[:, i1 + i] = q
            err = (column - q) / U[i1 + i, i1 + i]
            W1[:, i:] -= err[:, None] * U[i1 + i, i1 + i:i2][None, :]
            err_block[:, i] = err
        W[:, i2:] -= err_block @ U[i1:i2, i2:]
    Q = Q[:, torch.argsort(perm)]
    return quantize_weight(Q, fmt, group_size, qp)  # Q is on the grid of qp: encoding is exact


def quantize(model: nn.Module, layers: dict[str, nn.Linear], config: QuantConfig, calibration: Tensor,
             block_size: int = 128, damp: float = 0.01, act_order: bool = True, static_groups: bool = False,
             batch_size: int = 8, progress: bool = True) -> dict[str, QuantizedWeight]:
    """GPTQ on every linear, block by block (each block's layers from one pass of its inputs)."""
    fmt = config.make_format()
    result: dict[str, QuantizedWeight] = {}

    def step(_index: int, block: nn.Module, data: BlockData, _targets: list[Tensor]) -> None:
        hessians = input_hessians(block, data)
        linears = block_linears(block)
        for n, m in linears.items():  # an MoE expert no calibration token reached: GPTQ with H = I is rounding
            hessians.setdefault(n, torch.eye(m.in_features, device=m.weight.device))
        commit(block, {n: gptq_weight(m.weight, hessians[n], fmt, config.group_size, block_size, damp, act_order,
                                      static_groups) for n, m in linears.items()}, layers, result)

    run_blockwise(model, calibration, step, batch_size=batch_size, targets=False, progress=progress)
    return result
