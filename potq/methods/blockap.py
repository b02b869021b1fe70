"""Block-AP for any format (after EfficientQAT, Chen et al., 2024): per block, the float weights
*and* the group scales trained together against the float block's output.

Two-step's Step 2 trains one factor per group scale and leaves each weight on the level its
float value rounds to; here each weight is a trainable latent value too, so a weight can cross
to the neighbouring level when that lowers the block's output error — what GPTQ does in closed
form for one layer, done by gradient for the whole block (attention and MLP together). The
rounding passes straight through to the weights and holds the grid index for the scales (the
``lsq`` gradient: on a PoT grid ``∂(s·2^round(log2|w|/s))/∂w = s·2^e/|w| ≈ 1``); the codes are
re-derived from the latent weights every step. Scales are trained as ``ŝ = s*·(1 + Γ)``, so one
learning rate suits groups of any magnitude; ``s*`` is the activation-weighted grid search of
Step 1. Memory: one block's weights twice (float and latent) plus Adam's moments.
"""

from __future__ import annotations

import torch
from torch import Tensor

from potq.engine.blocks import BlockJob, block_linears, input_moments
from potq.engine.trainer import train_block
from potq.errors import PotqError
from potq.formats import QParams
from potq.formats.weights import QuantizedWeight, quantize_weight
from potq.methods.grid import search_scales

SCHEDULES = ("cosine", "constant")


def quantize_block(job: BlockJob, epochs: int = 10, lr: float = 1e-3, weight_lr: float = 1e-3,
                   schedule: str = "cosine") -> dict[str, QuantizedWeight]:
    """Train latent weights (Adam, ``weight_lr``) and scale factors Γ (``lr``) of every linear
    of ``job.block`` for ``epochs`` passes over its calibration batches, the rates constant or
    decayed along a cosine (``schedule``, EfficientQAT's); the best epoch is packed."""
    if schedule not in SCHEDULES:
        raise PotqError(f"unknown schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    linears = block_linears(job.block)
    moments = input_moments(job.block, job.data)
    start = {n: search_scales(m.weight.detach(), job.format_of(n), job.group_size, column_weight=moments.get(n))[0]
             for n, m in linears.items()}
    latent = {n: m.weight.detach().float().clone().requires_grad_(True) for n, m in linears.items()}
    gammas = {n: torch.zeros_like(qp.scale, requires_grad=True) for n, qp in start.items()}

    def tuned(name: str, _weight: Tensor) -> QParams:  # fp16-rounded as stored: the packing rounds the same
        return job.format_of(name).as_stored(QParams(start[name].scale * (1 + gammas[name]), start[name].zero))

    optimizer = torch.optim.Adam([{"params": list(latent.values()), "lr": weight_lr},
                                  {"params": list(gammas.values()), "lr": lr}])
    trained = train_block(job.block, job.data, job.targets, job.format_of, job.group_size, tuned, list(linears),
                          optimizer, epochs, "lsq", weights=latent, cosine=schedule == "cosine")
    job.report.update(loss=trained.history, kept=min(trained.history), diverged=trained.diverged)
    return {n: quantize_weight(trained.weights[n], job.format_of(n), job.group_size, trained.qparams[n])
            for n in linears}
