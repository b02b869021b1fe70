"""Step 2 of the two-step PoT method: block-wise fine-tuning of the group scales (thesis §3.3.2).

For each transformer block in order, every group scale becomes ``ŝ = s*·(1 + Γ)`` with one
trainable ``Γ`` per group (initialised to 0; ``s*`` from Step 1, or the naive round-to-nearest
scale for the ``finetune`` ablation). The codes are recomputed from ``ŝ`` at every step and the
block's mean squared output error against the float block, ``‖F(W, X) − F(W̃(Γ), X)‖²``, is
minimised with AdamW, Γ pulled towards 0 by λ (``decay``, below). Only Γ is trained; the float
weights stay frozen.

The gradient through the rounding (``grad``):
- ``"ste"``: the thesis' eq. 3.16 taken literally — ``round(log2(|w|/ŝ))`` passes straight
  through, so ``W̃ = ŝ·2^log2(|w|/ŝ) = |w|`` in the backward pass and only *clamped* weights move Γ;
- ``"detach"``: the exponents are recomputed from ŝ every step but held constant in the backward
  pass, ``∂W̃/∂ŝ = P·2^E`` (LSQ-like), so every weight pulls on its group's scale.

The pull of Γ towards 0 (``decay``, strength ``weight_decay``):
- ``"decoupled"`` (default): AdamW's decay, ``Γ ← Γ·(1 − lr·λ)`` each step, beside the loss;
- ``"coupled"``: ``λ/2‖Γ‖²`` added to the loss (plain Adam). The block loss is a *mean* squared
  error while the penalty sums over every group of the block (tens of thousands on SmolLM2), so
  at λ = 0.1 the penalty outweighs the error and pins Γ near 0: it cut the first blocks' error
  about half as much as the decoupled form (docs/results/step2-weight-decay.md).
"""

from __future__ import annotations

import time
import torch
from torch import Tensor, nn

from potq.config import QuantConfig
from potq.engine.blocks import BlockData, block_linears, commit, input_moments, run_blockwise
from potq.engine.trainer import Trained, record_block, train_block
from potq.formats import Format, QParams
from potq.formats.weights import QuantizedWeight, init_qparams, quantize_weight
from potq.methods.grid import check_objective, search_scales

GRADS = ("ste", "detach")
DECAYS = ("decoupled", "coupled")


def default_epochs(bits: int) -> int:
    """The thesis' schedule: 10 epochs at 3 bits and above, 40 at 2 bits."""
    return 40 if bits <= 2 else 10


def finetune_block(block: nn.Module, data: BlockData, targets: list[Tensor], start: dict[str, QParams],
                   fmt: Format, group_size: int, epochs: int, lr: float, weight_decay: float,
                   grad: str, decay: str = "decoupled") -> Trained:
    """Learn Γ (one per group, from 0) for every linear of ``block`` with AdamW (``decay``
    decoupled) or Adam and a penalty (coupled); returns the best epoch's parameters and the block
    loss history (:func:`potq.engine.trainer.train_block`)."""
    gammas = {name: torch.zeros_like(qp.scale, requires_grad=True) for name, qp in start.items()}

    def tuned(name: str, _weight: Tensor) -> QParams:
        return QParams(start[name].scale * (1 + gammas[name]), start[name].zero)

    def penalty() -> Tensor:
        return weight_decay / 2 * sum(g.pow(2).sum() for g in gammas.values())

    coupled = decay == "coupled"
    optimizer = (torch.optim.Adam(gammas.values(), lr=lr) if coupled
                 else torch.optim.AdamW(gammas.values(), lr=lr, weight_decay=weight_decay))
    return train_block(block, data, targets, fmt, group_size, tuned, list(start), optimizer, epochs, grad,
                       penalty if coupled else None)


def quantize(model: nn.Module, layers: dict[str, nn.Linear], config: QuantConfig, calibration: Tensor,
             epochs: int | None = None, lr: float = 1e-3, weight_decay: float = 0.1, grad: str = "detach",
             decay: str = "decoupled", batch_size: int = 4, target: str = "same-input", init: str = "grid",
             objective: str = "act", progress: bool = True) -> dict[str, QuantizedWeight]:
    """Step 1 (``init="grid"``, with ``objective`` as in :func:`potq.methods.grid.quantize`) or
    naive scales (``init="rtn"``), then Step 2, block by block.

    Step 1's objective defaults to ``"act"`` here, unlike ``--method grid`` whose default is the
    thesis' data-agnostic ``"mse"``: Step 2 has the block's calibration inputs anyway, and on
    SmolLM2-135M at 3 bits the plain-MSE start leaves the zero-excluded grid unusable where the
    activation-weighted start does not (docs/results/step1-objective-wikitext2.md). Step 2 only
    refines the scales near their start, so the start decides the outcome.

    Each block's float weights are overwritten with their quantized values once it is done, so
    the next block's calibration inputs flow through the quantized model.
    """
    if grad not in GRADS:
        raise ValueError(f"grad must be one of {GRADS}")
    if decay not in DECAYS:
        raise ValueError(f"decay must be one of {DECAYS}")
    check_objective(objective)
    fmt = config.make_format()
    epochs = default_epochs(config.bits) if epochs is None else epochs
    for p in model.parameters():
        p.requires_grad_(False)
    result: dict[str, QuantizedWeight] = {}
    blocks: list[dict] = []
    model.potq_report = {"settings": {"epochs": epochs, "lr": lr, "weight_decay": weight_decay, "decay": decay,
                                      "grad": grad, "batch_size": batch_size, "target": target, "init": init,
                                      "objective": objective if init == "grid" else None},
                         "blocks": blocks}

    def step(index: int, block: nn.Module, data: BlockData, targets: list[Tensor]) -> None:
        start_time = time.perf_counter()
        linears = block_linears(block)
        moments = input_moments(block, data) if objective == "act" and init == "grid" else {}
        start = {n: _initial(m.weight.detach(), fmt, config.group_size, init, moments.get(n))
                 for n, m in linears.items()}
        trained = finetune_block(block, data, targets, start, fmt, config.group_size, epochs, lr, weight_decay,
                                 grad, decay)
        commit(block, {n: quantize_weight(m.weight.detach(), fmt, config.group_size, trained.qparams[n])
                       for n, m in linears.items()}, layers, result)
        record_block(blocks, index, trained, start_time, progress)

    run_blockwise(model, calibration, step, batch_size=batch_size, target=target, progress=progress)
    return result


def _initial(w: Tensor, fmt: Format, group_size: int, init: str, column_weight: Tensor | None) -> QParams:
    if init == "grid":
        return search_scales(w, fmt, group_size, column_weight=column_weight)[0]
    return init_qparams(w, fmt, group_size)
