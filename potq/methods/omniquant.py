"""OmniQuant's weight-only part, learnable weight clipping (LWC; Shao et al., 2024), for any
format: each group's range is clipped by learned strengths ``σ(γ)`` (top) and ``σ(β)`` (bottom,
affine formats only), trained block by block against the float block's output with the
rounding passed straight through and AdamW.

With ``--format pot`` the clipped top of the range is the group's largest PoT level ``a`` —
the PoT adaptation the thesis calls OMNI_POT. It runs on the same block-wise trainer as the
two-step method's Step 2 (:mod:`potq.engine.trainer`); the difference is the parametrisation
(a clipped range from the weights rather than a factor on a searched scale) and the defaults.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from potq.config import QuantConfig
from potq.engine.blocks import BlockData, block_linears, commit, run_blockwise
from potq.engine.trainer import record_block, train_block
from potq.formats import QParams
from potq.formats.weights import QuantizedWeight, init_qparams, quantize_weight

INIT = 4.0  # σ(4) ≈ 0.982: start just inside the full range, as OmniQuant does


def quantize(model: nn.Module, layers: dict[str, nn.Linear], config: QuantConfig, calibration: Tensor,
             epochs: int = 20, lr: float = 1e-2, weight_decay: float = 0.0, grad: str | None = None,
             batch_size: int = 1, progress: bool = True) -> dict[str, QuantizedWeight]:
    """LWC on every block in order; each block's clipped weights are committed before the next.

    The defaults are OmniQuant's own weight-only schedule (20 epochs, lr 1e-2, one sequence per
    step). The clipping strengths start at σ(4), where σ' is small, so they need many steps to
    move: with a shorter schedule (10 epochs, lr 5e-3, four sequences per step, 80 steps per
    block on the default calibration) the block error barely left its round-to-nearest start.
    ``grad`` defaults to OmniQuant's straight-through rounding, except on log-rounding (PoT)
    grids, where that gradient reaches the clipping only through clamped weights and holding the
    codes (``detach``) measured better (docs/results/lwc-settings.md)."""
    fmt = config.make_format()
    grad = grad or ("detach" if fmt.log_rounding else "ste")
    for p in model.parameters():
        p.requires_grad_(False)
    result: dict[str, QuantizedWeight] = {}
    blocks: list[dict] = []
    model.potq_report = {"settings": {"epochs": epochs, "lr": lr, "weight_decay": weight_decay, "grad": grad,
                                      "batch_size": batch_size}, "blocks": blocks}

    def step(index: int, block: nn.Module, data: BlockData, targets: list[Tensor]) -> None:
        started = time.perf_counter()
        linears = block_linears(block)
        shapes = {n: init_qparams(m.weight.detach(), fmt, config.group_size).scale.shape for n, m in linears.items()}
        device = next(block.parameters()).device
        top = {n: torch.full(shape, INIT, requires_grad=True, device=device) for n, shape in shapes.items()}
        bottom = ({n: torch.full(shape, INIT, requires_grad=True, device=device) for n, shape in shapes.items()}
                  if fmt.has_zero else {})

        def clipped(name: str, weight: Tensor) -> QParams:
            low = torch.sigmoid(bottom[name]) if bottom else None
            return init_qparams(weight, fmt, config.group_size, clip=torch.sigmoid(top[name]), clip_low=low)

        optimizer = torch.optim.AdamW([*top.values(), *bottom.values()], lr=lr, weight_decay=weight_decay)
        trained = train_block(block, data, targets, fmt, config.group_size, clipped, list(linears), optimizer,
                              epochs, grad)
        commit(block, {n: quantize_weight(m.weight.detach(), fmt, config.group_size, trained.qparams[n])
                       for n, m in linears.items()}, layers, result)
        record_block(blocks, index, trained, started, progress)

    run_blockwise(model, calibration, step, batch_size=batch_size, progress=progress)
    return result
