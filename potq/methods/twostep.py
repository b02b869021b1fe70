"""Step 2 of the two-step PoT method: block-wise fine-tuning of the group scales (thesis §3.3.2).

For each transformer block in order, every group scale becomes ``ŝ = s*·(1 + Γ)`` with one
trainable ``Γ`` per group (initialised to 0; ``s*`` from Step 1, or the naive round-to-nearest
scale for the ``finetune`` ablation). The codes are recomputed from ``ŝ`` at every step and the
block's output error against the float block, ``‖F(W, X) − F(W̃(Γ), X)‖² + λ/2‖Γ‖²``, is
minimised with Adam. Only Γ is trained; the float weights stay frozen.

The gradient through the rounding (``grad``):
- ``"ste"``: the thesis' eq. 3.16 taken literally — ``round(log2(|w|/ŝ))`` passes straight
  through, so ``W̃ = ŝ·2^log2(|w|/ŝ) = |w|`` in the backward pass and only *clamped* weights move Γ;
- ``"detach"``: the exponents are recomputed from ŝ every step but held constant in the backward
  pass, ``∂W̃/∂ŝ = P·2^E`` (LSQ-like), so every weight pulls on its group's scale.
"""

from __future__ import annotations

import time
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from tqdm import tqdm

from potq.config import QuantConfig
from potq.engine.blocks import BlockData, block_linears, commit, input_moments, run_blockwise
from potq.errors import PotqError
from potq.formats import Format, QParams
from potq.formats.weights import QuantizedWeight, fake_quantize, init_qparams, quantize_weight
from potq.methods.grid import OBJECTIVES, search_scales

GRADS = ("ste", "detach")


def default_epochs(bits: int) -> int:
    """The thesis' schedule: 10 epochs at 3 bits and above, 40 at 2 bits."""
    return 40 if bits <= 2 else 10


def finetune_block(block: nn.Module, data: BlockData, targets: list[Tensor], start: dict[str, QParams],
                   fmt: Format, group_size: int, epochs: int, lr: float, weight_decay: float,
                   grad: str) -> tuple[dict[str, QParams], list[float]]:
    """Learn Γ for every linear of ``block``; returns the parameters of the epoch with the lowest
    block loss (Γ = 0 included: rounding makes the loss jump as codes flip, so a later epoch can
    be worse than an earlier one) and the loss before training and after each epoch (mean squared
    output error over the calibration set)."""
    weights = {name: block.get_submodule(name).weight.detach() for name in start}
    gammas = {name: torch.zeros_like(qp.scale, requires_grad=True) for name, qp in start.items()}
    optimizer = torch.optim.Adam(gammas.values(), lr=lr)

    def tuned(name: str) -> QParams:
        return QParams(start[name].scale * (1 + gammas[name]), start[name].zero)

    def block_loss(x: Tensor, y: Tensor, g: str) -> Tensor:
        params = {f"{n}.weight": fake_quantize(weights[n], fmt, group_size, tuned(n), g) for n in weights}
        out = functional_call(block, params, (x,), data.kwargs)
        return F.mse_loss(out[0] if isinstance(out, tuple) else out, y)

    def evaluate() -> float:
        with torch.no_grad():
            return sum(block_loss(x, y, "none").item() for x, y in zip(data.inputs, targets)) / len(targets)

    history = [evaluate()]
    best = (history[0], {name: start[name] for name in start})
    for _ in range(epochs):
        for x, y in zip(data.inputs, targets):
            penalty = sum(g.pow(2).sum() for g in gammas.values())
            loss = block_loss(x, y, grad) + weight_decay / 2 * penalty
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        history.append(evaluate())
        if history[-1] < best[0]:
            best = (history[-1], {name: tuned(name).map(lambda t: t.detach()) for name in start})
    return best[1], history


def quantize(model: nn.Module, layers: dict[str, nn.Linear], config: QuantConfig, calibration: Tensor,
             epochs: int | None = None, lr: float = 1e-3, weight_decay: float = 0.1, grad: str = "detach",
             batch_size: int = 4, target: str = "same-input", init: str = "grid", objective: str = "mse",
             progress: bool = True) -> dict[str, QuantizedWeight]:
    """Step 1 (``init="grid"``, with ``objective`` as in :func:`potq.methods.grid.quantize`) or
    naive scales (``init="rtn"``), then Step 2, block by block.

    Each block's float weights are overwritten with their quantized values once it is done, so
    the next block's calibration inputs flow through the quantized model.
    """
    if grad not in GRADS:
        raise ValueError(f"grad must be one of {GRADS}")
    if objective not in OBJECTIVES:
        raise PotqError(f"unknown objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")
    fmt = config.make_format()
    epochs = default_epochs(config.bits) if epochs is None else epochs
    for p in model.parameters():
        p.requires_grad_(False)
    result: dict[str, QuantizedWeight] = {}
    blocks: list[dict] = []
    model.potq_report = {"settings": {"epochs": epochs, "lr": lr, "weight_decay": weight_decay, "grad": grad,
                                      "batch_size": batch_size, "target": target, "init": init,
                                      "objective": objective},
                         "blocks": blocks}

    def step(index: int, block: nn.Module, data: BlockData, targets: list[Tensor]) -> None:
        start_time = time.perf_counter()
        linears = block_linears(block)
        moments = input_moments(block, data) if objective == "act" and init == "grid" else {}
        start = {n: _initial(m.weight.detach(), fmt, config.group_size, init, moments.get(n))
                 for n, m in linears.items()}
        tuned, history = finetune_block(block, data, targets, start, fmt, config.group_size, epochs,
                                        lr, weight_decay, grad)
        commit(block, {n: quantize_weight(m.weight.detach(), fmt, config.group_size, tuned[n])
                       for n, m in linears.items()}, layers, result)
        blocks.append({"block": index, "loss": history, "kept": min(history),
                       "seconds": time.perf_counter() - start_time})
        if progress:
            tqdm.write(f"block {index}: output MSE {history[0]:.4g} -> {min(history):.4g} "
                       f"({100 * (min(history) / history[0] - 1):+.1f} %) in {blocks[-1]['seconds']:.0f} s")

    run_blockwise(model, calibration, step, batch_size=batch_size, target=target, progress=progress)
    return result


def _initial(w: Tensor, fmt: Format, group_size: int, init: str, column_weight: Tensor | None) -> QParams:
    if init == "grid":
        return search_scales(w, fmt, group_size, column_weight=column_weight)[0]
    return init_qparams(w, fmt, group_size)
