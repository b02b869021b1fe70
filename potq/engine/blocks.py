"""The block-wise engine every data-dependent method runs on (two-step Step 2, later GPTQ, AWQ,
OmniQuant): walk the transformer blocks in order, hand each one its calibration inputs and float
targets, let the method quantize it in place, and propagate.

Inputs of block ``l`` are the calibration activations after the *already quantized* blocks
``0..l-1`` (so each block learns to correct what the earlier ones got wrong). The target is, by
default, the float block's output on those same inputs (``target="same-input"``): the method then
solves exactly the thesis' per-block problem ``‖F(W, X) − F(W̃, X)‖²``. ``target="float-stream"``
instead keeps a second, all-float stream and aims at the float model's own activations.
Memory: one block plus its calibration activations (two or three ``[N, L, d]`` tensors).

Device: the model stays where it is; each block and the activations run on
:func:`potq.devices.current` (``--device``) for the block's turn, so a GPU needs room for one
block, not the model.

Streaming: a model loaded with ``lazy=True`` (``model.potq_lazy``, :class:`potq.models.lazy.LazyBlocks`)
has its blocks' weights read from the files when their turn comes and its linears' float
weights dropped after, so a model larger than memory quantizes with any block-wise method.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from tqdm import tqdm

from potq import devices
from potq.engine import resume
from potq.errors import PotqError
from potq.formats import Format
from potq.formats.weights import QuantizedWeight
from potq.models import transformer_blocks

TARGETS = ("same-input", "float-stream")


@dataclass
class BlockData:
    """Calibration activations entering one block, in mini-batches, and the keyword arguments the
    model passes that block (causal mask, rotary embeddings, positions: identical per batch; not
    always per block — see :func:`block_kwargs`)."""

    inputs: list[Tensor]
    kwargs: dict[str, Any]


class _Captured(Exception):
    """Raised by the hook on block 0 once its inputs are recorded: the rest of the model is skipped."""


NOT_KWARGS = ("hidden_states", "past_key_values", "use_cache")  # what a block gets that is not the model's context


def block_kwargs(model: nn.Module, ids: Tensor) -> list[dict[str, Any]]:
    """The keyword arguments the model hands each of its blocks, in order, on the batch ``ids``.

    They differ from block to block in some families: Gemma-2/3 give their sliding-window layers
    a windowed mask and rotary tables of their own base, their global layers the full mask and
    another base. Each block's ``forward`` is swapped, for one pass, for one that records its
    keyword arguments and hands its input on unchanged, so the pass costs the embeddings and the
    masks, not the blocks (a streamed model's blocks need not be read)."""
    blocks = transformer_blocks(model)
    seen: list[dict[str, Any]] = []

    def recorder(last: bool) -> Callable:
        def forward(hidden_states: Tensor, *_args: Any, **kw: Any) -> Tensor:
            seen.append({k: v for k, v in kw.items() if k not in NOT_KWARGS})
            if last:
                raise _Captured
            return hidden_states
        return forward

    own = [block.__dict__.get("forward") for block in blocks]  # a forward set on the instance (a hook's)
    for i, block in enumerate(blocks):
        block.forward = recorder(i == len(blocks) - 1)
    try:
        with torch.no_grad():
            model(ids.to(devices.of(model)), use_cache=False)
    except _Captured:
        pass
    finally:
        for block, forward in zip(blocks, own):
            if forward is None:
                del block.forward  # the class's own forward again
            else:
                block.forward = forward
    return devices.to_current(seen)


def capture_inputs(model: nn.Module, ids: Tensor, batch_size: int) -> BlockData:
    """Run the embeddings on ``ids`` ``[N, L]`` and record what enters the first block."""
    first = transformer_blocks(model)[0]
    inputs: list[Tensor] = []
    kwargs: dict[str, Any] = {}

    def hook(_module: nn.Module, args: tuple, kw: dict) -> None:
        inputs.append(args[0] if args else kw["hidden_states"])
        kwargs.update({k: v for k, v in kw.items() if k not in NOT_KWARGS})
        raise _Captured

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    home = devices.of(model)
    try:
        with torch.no_grad():
            for batch in ids.to(home).split(batch_size):
                try:
                    model(batch, use_cache=False)
                except _Captured:
                    pass
    finally:
        handle.remove()
    return BlockData(devices.to_current(inputs), devices.to_current(kwargs))


def block_forward(block: nn.Module, x: Tensor, kwargs: dict[str, Any],
                  weights: dict[str, Tensor] | None = None) -> Tensor:
    """The block's hidden-state output on ``x``; with ``weights`` (linear name -> weight) run with
    those weights instead of its own, through ``functional_call`` (the module is not modified)."""
    if weights is None:
        out = block(x, **kwargs)
    else:
        out = functional_call(block, {f"{n}.weight": w for n, w in weights.items()}, (x,), kwargs)
    return out[0] if isinstance(out, tuple) else out


def output_error(block: nn.Module, data: BlockData, targets: list[Tensor], weights: dict[str, Tensor]) -> float:
    """Mean squared error of the block's output with ``weights`` against ``targets``, averaged over
    the calibration batches: the block loss every method reports and searches on."""
    with torch.no_grad():
        errors = [F.mse_loss(block_forward(block, x, data.kwargs, weights), y).item()
                  for x, y in zip(data.inputs, targets)]
    return sum(errors) / len(errors)


def outputs(block: nn.Module, data: BlockData) -> list[Tensor]:
    with torch.no_grad():
        return [block_forward(block, x, data.kwargs) for x in data.inputs]


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers of one block, by their name inside it."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def each_input(block: nn.Module, data: BlockData, visit: Callable[[str, Tensor], None]) -> None:
    """Run ``block`` on the calibration inputs and call ``visit(name, x)`` with the input ``x``
    (``[tokens, in]``, float32) of every linear it contains, batch by batch."""
    handles = [m.register_forward_hook(
        lambda _m, args, _out, name=name: visit(name, args[0].detach().reshape(-1, args[0].shape[-1]).float()))
        for name, m in block_linears(block).items()]
    try:
        outputs(block, data)
    finally:
        for h in handles:
            h.remove()


def input_statistic(block: nn.Module, data: BlockData, statistic: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
    """Mean over calibration tokens of ``statistic(x)`` (a sum over the rows of ``x``) for the
    input of every linear in ``block``, from one forward pass of the block."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def visit(name: str, x: Tensor) -> None:
        sums[name] = statistic(x) + sums.get(name, 0)
        counts[name] = counts.get(name, 0) + x.shape[0]

    each_input(block, data, visit)
    return {name: sums[name] / counts[name] for name in sums}


def input_moments(block: nn.Module, data: BlockData) -> dict[str, Tensor]:
    """E[x²] per input channel of every linear (the diagonal of GPTQ's Hessian ``XᵀX``): how
    much an error in each weight column costs in output error."""
    return input_statistic(block, data, lambda x: x.pow(2).sum(0))


def input_hessians(block: nn.Module, data: BlockData) -> dict[str, Tensor]:
    """``H = 2·E[x xᵀ]`` of every linear: the curvature of its squared output error (GPTQ)."""
    return input_statistic(block, data, lambda x: 2 * x.T @ x)


def commit(block: nn.Module, chosen: dict[str, QuantizedWeight], layers: dict[str, nn.Linear],
           result: dict[str, QuantizedWeight]) -> None:
    """Overwrite each linear of ``block`` with its quantized weight, so the blocks after it see
    the quantized outputs, and file it in ``result`` under its model-wide name."""
    by_module = {id(m): name for name, m in layers.items()}
    checkpoint = resume.active()
    if checkpoint is not None:  # the blocks a resumed run skipped: their entries, restored
        result.update({name: qw.compact() for name, qw in checkpoint.pending.items()})
        checkpoint.pending = {}
    for local, qw in chosen.items():
        module = block.get_submodule(local)
        module.weight.data.copy_(qw.dequantize())
        qw = qw.to(devices.CPU)  # what the model and storage keep, codes bit-packed until then
        result[by_module[id(module)]] = qw.compact()
        if checkpoint is not None:
            checkpoint.committed[by_module[id(module)]] = qw


@dataclass
class BlockJob:
    """One block's turn in a staged method (:mod:`potq.methods.pipeline`): the block, its
    calibration inputs and float targets, the grid, and what the stages chose (``report``)."""

    index: int
    block: nn.Module
    data: BlockData
    targets: list[Tensor]
    fmt: Format
    group_size: int
    report: dict[str, Any]
    progress: bool
    formats: dict[str, Format] = field(default_factory=dict)  # linears given another grid (a bit budget)

    def format_of(self, name: str) -> Format:
        """The grid linear ``name`` (its name in the block) is rounded to."""
        return self.formats.get(name, self.fmt)


BlockMethod = Callable[[int, nn.Module, BlockData, list[Tensor]], None]


def run_blockwise(model: nn.Module, ids: Tensor, method: BlockMethod, batch_size: int = 8,
                  target: str = "same-input", targets: bool = True, progress: bool = True) -> None:
    """Call ``method(index, block, data, targets)`` on every block in order; ``method`` quantizes
    the block in place, and its outputs become the next block's inputs. Methods that do not
    compare against the float block pass ``targets=False`` and get an empty list."""
    if target not in TARGETS:
        raise PotqError(f"unknown target {target!r}: choose one of {', '.join(TARGETS)}")
    model.eval()
    data = capture_inputs(model, ids, batch_size)
    kwargs_of = block_kwargs(model, ids.split(batch_size)[-1])  # the batch capture_inputs took its kwargs from
    float_data = BlockData(list(data.inputs), data.kwargs) if target == "float-stream" else None
    blocks = transformer_blocks(model)
    lazy = getattr(model, "potq_lazy", None)
    checkpoint = resume.active()  # see potq.engine.resume: a killed run goes on from its last block
    restored = checkpoint.restore(blocks, assign=lazy is not None) if checkpoint is not None else None
    start = 0
    if restored is not None:
        start = checkpoint.done
        data = BlockData(devices.to_current(restored[0]), data.kwargs)
        float_data = None if restored[1] is None else BlockData(devices.to_current(restored[1]), data.kwargs)
        if progress:
            tqdm.write(f"resuming after block {start - 1} (checkpoint {checkpoint.folder})", file=sys.stderr)
        for block in blocks[:start] if lazy is not None else []:
            lazy.release(block)
    bar = tqdm(range(start, len(blocks)), initial=start, total=len(blocks), desc="blocks", unit="block",
               disable=not progress)
    for index in bar:
        block = blocks[index]
        data = BlockData(data.inputs, kwargs_of[index])
        float_data = None if float_data is None else BlockData(float_data.inputs, kwargs_of[index])
        if lazy is not None:
            lazy.fill(block)
        home = next(block.parameters()).device
        block.to(devices.current())
        wanted = outputs(block, float_data or data) if targets or float_data is not None else []
        method(index, block, data, wanted)
        data = BlockData(outputs(block, data), data.kwargs)
        block.to(home)
        if float_data is not None:
            float_data = BlockData(wanted, data.kwargs)
        # the last block is never checkpointed: a resumed run always runs at least one block, whose
        # commit files the restored blocks' entries in the method's result
        if checkpoint is not None and index < len(blocks) - 1:
            checkpoint.save(index, block, data.inputs, None if float_data is None else float_data.inputs)
        if lazy is not None:
            lazy.release(block)
