"""The block-wise trainer shared by every method that learns quantization parameters against a
block's float output (two-step Step 2, OmniQuant's learnable weight clipping).

A method says how its trainable tensors turn into each linear's :class:`QParams`; the trainer
fake-quantizes the block's frozen float weights with them (codes recomputed every step, the
rounding's gradient chosen by ``grad``), runs the block with those weights through
``functional_call`` (:func:`~potq.engine.blocks.block_forward`; the module itself is never
modified), and minimises the mean squared error to the targets plus the method's penalty. It
returns the parameters of the epoch with the lowest block loss — the start included: rounding
makes the loss jump as codes flip, so a later epoch can be worse than an earlier one.
"""

from __future__ import annotations

import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from potq.engine.blocks import BlockData, block_forward, output_error
from potq.formats import Format, QParams
from potq.formats.weights import fake_quantize


def train_block(block: nn.Module, data: BlockData, targets: list[Tensor], fmt: Format, group_size: int,
                qparams_of: Callable[[str, Tensor], QParams], names: list[str], optimizer: torch.optim.Optimizer,
                epochs: int, grad: str, penalty: Callable[[], Tensor] | None = None,
                ) -> tuple[dict[str, QParams], list[float]]:
    """Train the tensors in ``optimizer`` for ``epochs`` passes over the calibration batches.

    ``qparams_of(name, weight)`` builds the current parameters of linear ``name`` from the
    trainable tensors. Returns the best epoch's parameters (detached) and the block loss (mean
    squared output error over the calibration set) before training and after each epoch.
    """
    weights = {name: block.get_submodule(name).weight.detach() for name in names}

    def current() -> dict[str, QParams]:
        return {n: qparams_of(n, weights[n]) for n in names}

    def quantized(qps: dict[str, QParams], g: str) -> dict[str, Tensor]:
        return {n: fake_quantize(weights[n], fmt, group_size, qps[n], g) for n in names}

    def evaluate() -> tuple[float, dict[str, QParams]]:
        with torch.no_grad():
            qps = current()
            return output_error(block, data, targets, quantized(qps, "none")), qps

    loss, qps = evaluate()
    history, best = [loss], (loss, qps)
    for _ in range(epochs):
        for x, y in zip(data.inputs, targets):
            loss_t = F.mse_loss(block_forward(block, x, data.kwargs, quantized(current(), grad)), y)
            if penalty is not None:
                loss_t = loss_t + penalty()
            optimizer.zero_grad(set_to_none=True)
            loss_t.backward()
            optimizer.step()
        loss, qps = evaluate()
        history.append(loss)
        if loss < best[0]:
            best = (loss, qps)
    return best[1], history


def record_block(blocks: list[dict], index: int, history: list[float], started: float, progress: bool) -> None:
    """Append one block's loss history and wall time to the method's report (``potq_report``)
    and, with ``progress``, print its before/after line above the progress bar."""
    blocks.append({"block": index, "loss": history, "kept": min(history),
                   "seconds": time.perf_counter() - started})
    if progress:
        tqdm.write(f"block {index}: output MSE {history[0]:.4g} -> {min(history):.4g} "
                   f"({100 * (min(history) / history[0] - 1):+.1f} %) in {blocks[-1]['seconds']:.0f} s",
                   file=sys.stderr)
