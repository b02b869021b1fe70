"""The block-wise trainer shared by every method that learns quantization parameters against a
block's float output (two-step Step 2, OmniQuant's learnable weight clipping, Block-AP).

A method says how its trainable tensors turn into each linear's :class:`QParams`; the trainer
fake-quantizes the block's frozen float weights with them (codes recomputed every step, the
rounding's gradient chosen by ``grad``), runs the block with those weights through
``functional_call`` (:func:`~potq.engine.blocks.block_forward`; the module itself is never
modified), and minimises the mean squared error to the targets plus the method's penalty. It
returns the parameters of the epoch with the lowest block loss — the start included: rounding
makes the loss jump as codes flip, so a later epoch can be worse than an earlier one.

A method that trains the weights themselves (Block-AP) hands in its own latent weights, which
the optimizer updates; the best epoch's latent weights come back with its parameters.

A step that overflows (a rate far too large for the model's weights, a gradient past float range)
leaves the loss or the trained tensors not finite; the block's training stops at the first such
step, keeps the best epoch before it, and says so (``Trained.diverged``), rather than rounding
weights that went NaN.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from potq.engine.blocks import BlockData, block_forward, output_error
from potq.formats import Format, QParams
from potq.formats.weights import fake_quantize


class Trained(NamedTuple):
    """The best epoch of one block: its parameters and the weights they round (both detached),
    and the block loss before training and after each epoch."""

    qparams: dict[str, QParams]
    weights: dict[str, Tensor]
    history: list[float]
    diverged: bool = False  # stopped at a step whose loss or trained tensors were not finite


def train_block(block: nn.Module, data: BlockData, targets: list[Tensor], fmt: Format | Callable[[str], Format],
                group_size: int,
                qparams_of: Callable[[str, Tensor], QParams], names: list[str], optimizer: torch.optim.Optimizer,
                epochs: int, grad: str, penalty: Callable[[], Tensor] | None = None,
                weights: dict[str, Tensor] | None = None, cosine: bool = False) -> Trained:
    """Train the tensors in ``optimizer`` for ``epochs`` passes over the calibration batches.

    ``qparams_of(name, weight)`` builds the current parameters of linear ``name`` from the
    trainable tensors; ``weights`` are the float weights rounded (default: the block's own,
    frozen); ``fmt`` is every linear's grid, or a function giving each one's (a bit budget);
    ``cosine`` decays every learning rate to 0 along a cosine over the run's steps.
    Returns the best epoch (:class:`Trained`); the block loss is the mean squared output error
    over the calibration set.
    """
    format_of = fmt if callable(fmt) else lambda _name: fmt
    if weights is None:
        weights = {name: block.get_submodule(name).weight.detach() for name in names}

    def current() -> dict[str, QParams]:
        return {n: qparams_of(n, weights[n]) for n in names}

    def quantized(qps: dict[str, QParams], g: str) -> dict[str, Tensor]:
        return {n: fake_quantize(weights[n], format_of(n), group_size, qps[n], g) for n in names}

    def evaluate() -> tuple[float, dict[str, QParams], dict[str, Tensor]]:
        with torch.no_grad():
            qps = {n: qp.map(lambda t: t.detach().clone()) for n, qp in current().items()}
            return (output_error(block, data, targets, quantized(qps, "none")), qps,
                    {n: w.detach().clone() if w.requires_grad else w for n, w in weights.items()})

    loss, qps, kept = evaluate()
    history, best = [loss], (loss, qps, kept)
    steps = max(1, epochs * len(data.inputs))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    for _ in range(epochs):
        for x, y in zip(data.inputs, targets):
            loss_t = F.mse_loss(block_forward(block, x, data.kwargs, quantized(current(), grad)), y)
            if penalty is not None:
                loss_t = loss_t + penalty()
            if not torch.isfinite(loss_t):
                return Trained(best[1], best[2], history, diverged=True)
            optimizer.zero_grad(set_to_none=True)
            loss_t.backward()
            optimizer.step()
            if not all(torch.isfinite(t).all() for group in optimizer.param_groups for t in group["params"]):
                return Trained(best[1], best[2], history, diverged=True)
            if cosine:
                schedule.step()
        loss, qps, kept = evaluate()
        history.append(loss)
        if loss < best[0]:
            best = (loss, qps, kept)
    return Trained(best[1], best[2], history)


def record_block(blocks: list[dict], index: int, trained: Trained, started: float, progress: bool) -> None:
    """Append one block's loss history and wall time to the method's report (``potq_report``)
    and, with ``progress``, print its before/after line above the progress bar."""
    blocks.append({"block": index, "loss": trained.history, "kept": min(trained.history),
                   "diverged": trained.diverged, "seconds": time.perf_counter() - started})
    if progress:
        note_block(index, trained.history, blocks[-1]["seconds"], trained.diverged)


def note_block(index: int, history: list[float], seconds: float, diverged: bool = False) -> None:
    """One block's before/after line above the progress bar (and why training stopped early)."""
    stopped = (" — training diverged (its loss or tensors stopped being finite) and stopped there, the best epoch "
               "before it kept; a smaller learning rate (Block-AP: --weight-lr) "
               "suits this model's weights" if diverged else "")
    tqdm.write(f"block {index}: output MSE {history[0]:.4g} -> {min(history):.4g} "
               f"({100 * (min(history) / history[0] - 1):+.1f} %) in {seconds:.0f} s{stopped}", file=sys.stderr)
