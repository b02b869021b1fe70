"""AWQ (Lin et al., 2024) for any format: protect the input channels that see large activations
by scaling them up before rounding and folding the inverse scale into the layer before.

Per block, for each group of linears that share an input (q/k/v after the input norm, o after v
when the shapes allow it, gate/up after the post-attention norm, down after up):
``s = mean|x|^α`` (normalised to geometric mean 1), α grid-searched over 0, 0.05 … 0.95 for the
lowest error of the *block output* with that group quantized as ``Q(W·diag(s))·diag(s)⁻¹``; the
best ``s`` is folded exactly into the previous norm / linear (``W·diag(s)`` here,
``÷s`` there). Then each linear's group ranges are clipped by a grid-searched ratio (AWQ's
auto-clip) that minimises the linear's own output error on sampled calibration tokens, and the
block is rounded to nearest. With ``--format pot`` this is the thesis' AWQ_POT.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from potq.config import QuantConfig
from potq.engine.blocks import (BlockData, BlockJob, block_linears, commit, each_input, input_statistic, output_error,
                                run_blockwise)
from potq.formats import Format
from potq.formats.grouping import to_groups
from potq.formats.weights import QuantizedWeight, fake_quantize, init_qparams, quantize_weight
from potq.models.arch import fold_groups

ALPHAS = torch.arange(20) / 20  # 0, 0.05, …, 0.95 (the reference grid)
CLIPS = 1 - torch.arange(20) / 40  # 1.0, 0.975, …, 0.525


def search_scale(block: nn.Module, data: BlockData, targets: list[Tensor], mean_abs: Tensor,
                 formats: dict[str, Format], group_size: int) -> tuple[Tensor, float, list[float]]:
    """The best ``s = mean|x|^α`` for one group of linears (``formats``: each one's grid):
    ``(s, α, error per α)``."""
    originals = {n: block.get_submodule(n).weight.detach() for n in formats}
    scales, errors = [], []
    for alpha in ALPHAS.tolist():
        s = mean_abs.clamp(min=1e-4).pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        trial = {n: fake_quantize(w * s, formats[n], group_size, init_qparams(w * s, formats[n], group_size)) / s
                 for n, w in originals.items()}
        scales.append(s)
        errors.append(output_error(block, data, targets, trial))
    best = int(torch.tensor(errors).argmin())
    return scales[best], float(ALPHAS[best]), errors


def search_clip(w: Tensor, x: Tensor, fmt: Format, group_size: int) -> Tensor:
    """Per group, the clip ratio in ``CLIPS`` with the smallest output error on tokens ``x``
    ``[T, in]``: ``mean_t (Σ_{k∈g} (q_k − w_k)·x_tk)²``."""
    wg, xg = to_groups(w.float(), group_size), to_groups(x.float(), group_size)  # [rows, g, G], [T, g, G]
    errors = []
    for c in CLIPS.tolist():
        dq = fake_quantize(w, fmt, group_size, init_qparams(w, fmt, group_size, clip=c))
        diff = to_groups(dq, group_size) - wg
        errors.append(torch.einsum("rgk,tgk->rgt", diff, xg).pow(2).mean(-1))
    return CLIPS.to(w.device)[torch.stack(errors).argmin(0)]


def rescale(block: nn.Module, data: BlockData, targets: list[Tensor], format_of: Callable[[str], Format],
            group_size: int, note: bool = False) -> dict[str, dict[str, float]]:
    """AWQ's equivalent transformation of one float block, in place: for each group of linears
    sharing an input, the searched ``s`` scales their input channels up and is folded out of the
    layer before (``format_of(name)``: the grid each linear will be rounded to). Returns
    ``{group: {"alpha", "error"}}``; ``note`` says once which linears no rescaling reaches in this
    architecture."""
    chosen = {}
    mean_abs = input_statistic(block, data, lambda x: x.abs().sum(0))  # folding keeps every input
    folds = fold_groups(block, data.inputs[0], data.kwargs)
    unscaled = sorted(set(block_linears(block)) - {n for f in folds for n in f.names})
    if unscaled and note:
        tqdm.write(f"awq: no equivalent rescaling feeds {', '.join(unscaled)} in this architecture; "
                   "those layers are rounded without it", file=sys.stderr)
    for fold in folds:
        s, alpha, errors = search_scale(block, data, targets, mean_abs[fold.names[0]],
                                        {n: format_of(n) for n in fold.names}, group_size)
        fold.apply(block, s)
        chosen["+".join(n.split(".")[-1] for n in fold.names)] = {"alpha": alpha, "error": min(errors)}
    return chosen


def transform_block(job: BlockJob) -> None:
    """The pipeline's ``awq`` stage: :func:`rescale` only; the stage after it rounds."""
    job.report["awq"] = rescale(job.block, job.data, job.targets, job.format_of, job.group_size,
                                note=job.index == 0 and job.progress)


def quantize(model: nn.Module, layers: dict[str, nn.Linear], config: QuantConfig, calibration: Tensor,
             clip: bool = True, clip_tokens: int = 512, batch_size: int = 8,
             progress: bool = True) -> dict[str, QuantizedWeight]:
    """AWQ scale search and folding, optional clip search, then round-to-nearest, block by block."""
    fmt = config.make_format()
    result: dict[str, QuantizedWeight] = {}
    blocks: list[dict[str, Any]] = []
    model.potq_report = {"settings": {"clip": clip, "clip_tokens": clip_tokens, "batch_size": batch_size},
                         "blocks": blocks}

    def step(index: int, block: nn.Module, data: BlockData, targets: list[Tensor]) -> None:
        chosen = rescale(block, data, targets, lambda _name: fmt, config.group_size, note=index == 0 and progress)
        tokens = _sample_tokens(block, data, clip_tokens) if clip else {}
        quantized = {}
        for name, module in block_linears(block).items():
            w = module.weight.detach()
            ratio = search_clip(w, tokens[name], fmt, config.group_size) if name in tokens else 1.0  # unrouted expert
            quantized[name] = quantize_weight(w, fmt, config.group_size,
                                              init_qparams(w, fmt, config.group_size, clip=ratio))
        commit(block, quantized, layers, result)
        blocks.append({"block": index, "groups": chosen})
        if progress:
            alphas = ", ".join(f"{k} {v['alpha']:.2f}" for k, v in chosen.items())
            tqdm.write(f"block {index}: α {alphas}", file=sys.stderr)

    run_blockwise(model, calibration, step, batch_size=batch_size, progress=progress)
    return result


def _sample_tokens(block: nn.Module, data: BlockData, count: int) -> dict[str, Tensor]:
    """About ``count`` input rows of every linear, evenly spaced over the calibration tokens
    (taken after the scales are folded in, so they match the weights being clipped)."""
    stride = max(1, sum(x.shape[0] * x.shape[1] for x in data.inputs) // count)
    rows: dict[str, list[Tensor]] = {}
    each_input(block, data, lambda name, x: rows.setdefault(name, []).append(x[::stride]))
    return {name: torch.cat(parts) for name, parts in rows.items()}
