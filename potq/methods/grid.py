"""Step 1 of the two-step PoT method: a data-agnostic grid search of each group's scale.

For every group, try the scale multipliers ``b ∈ {0.01, 0.02, …, 2.00}`` (thesis Algorithm 1,
eq. 3.11–3.12) on top of the round-to-nearest scale and keep the ``b`` with the smallest squared
error of the group. All groups of a layer are searched at once; the multipliers are processed in
chunks so that memory stays at ``chunk × weights`` floats. The search goes through
``Format.init_qparams(clip=b)``, so it works for every format, uniform included (there it is the
usual clipping-ratio search).

PoT and APoT grids get an exact shortcut (:func:`stepped_errors`) that never tries the 200
multipliers one by one: trying them costs ``200 × weights`` log/exp evaluations, about six minutes
for SmolLM2-135M on two cores, where the shortcut takes seconds.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from potq import devices
from potq.config import QuantConfig
from potq.engine.blocks import BlockData, BlockJob, block_linears, commit, input_moments, run_blockwise
from potq.errors import PotqError
from potq.formats import Format, QParams
from potq.formats.grouping import PER_TENSOR, to_groups
from potq.formats.weights import QuantizedWeight, init_qparams, quantize_weight

OBJECTIVES = ("mse", "act")
MULTIPLIERS = torch.arange(1, 201, dtype=torch.float32) / 100  # the thesis' b grid


def group_errors(w: Tensor, fmt: Format, group_size: int, multipliers: Tensor,
                 column_weight: Tensor | None = None) -> Tensor:
    """Squared error of every group under every multiplier, ``[len(multipliers), rows, groups]``.

    ``column_weight`` (``[in]``) weighs each input column's squared error (ones by default);
    the zero padding of a ragged last group always gets weight 0, so it never counts.
    """
    wg = to_groups(w.float(), group_size)
    ones = torch.ones(w.shape[1], device=w.device) if column_weight is None else column_weight.float()
    weight = to_groups(ones[None], group_size)  # [1, groups, G], zeros on the padding
    steps = fmt.magnitude_steps()
    if steps is not None:
        return stepped_errors(wg, steps, multipliers, weight)
    return tried_errors(wg, fmt, multipliers, weight)


def tried_errors(wg: Tensor, fmt: Format, multipliers: Tensor, weight: Tensor, chunk: int = 16) -> Tensor:
    """Any format: quantize with each multiplier in turn (chunked) and measure."""
    errors = []
    for bs in multipliers.split(chunk):
        qp = fmt.init_qparams(wg.unsqueeze(0), bs.view(-1, 1, 1))  # [chunk, rows, groups]
        deq = fmt.fake_quant(wg.unsqueeze(0), qp)
        errors.append(((deq - wg) ** 2 * weight).sum(-1))
    return torch.cat(errors)


def stepped_errors(wg: Tensor, steps: list[tuple[float, float, float]], multipliers: Tensor,
                   weight: Tensor) -> Tensor:
    """Sign × magnitude grids scaled by their largest level (PoT, APoT), exactly, without trying
    each multiplier; ``steps`` is the format's :meth:`~potq.formats.Format.magnitude_steps`.

    With ``a0 = max|w|`` of a group and ``x = log2(|w|/a0)``, a weight's level ``c`` under the
    multiplier b depends on ``x − log2 b`` alone (the grid is ``a0·b`` times fixed levels): a
    step function of b that drops one level each time ``log2 b`` passes ``x − t`` for a step at
    ``t`` (``t = n − ½`` for PoT's log-domain rounding). The weighted error of a group is
    ``Σλw² − 2·a0·b·Σλ|w|c + a0²·b²·Σλc²``; both sums change only at those crossings, so each
    weight adds its crossings to a per-group histogram over the b grid, and a cumulative sum
    gives both sums at every b. Cost: one bucket look-up per step and weight instead of 200
    quantizations.
    """
    m = len(multipliers)
    crossings = _grid_counter(multipliers.float())
    rows, groups, width = wg.shape
    mag = wg.abs()
    a0 = mag.amax(dim=-1, keepdim=True)
    x = torch.log2((mag / a0.clamp(min=torch.finfo(torch.float32).tiny)).clamp(min=2.0**-140))
    lam = weight.expand_as(wg).double()
    lam_mag = lam * mag.double()
    slot = torch.arange(rows * groups, device=wg.device).view(rows, groups, 1) * (m + 1)
    h1 = torch.zeros(rows * groups * (m + 1), dtype=torch.float64, device=wg.device)
    h2 = torch.zeros_like(h1)
    for at, above, below in steps:  # a weight's level steps from `above` down to `below`
        flat = (slot + crossings(x - at)).reshape(-1)
        h1.index_add_(0, flat, (lam_mag * (above - below)).reshape(-1))
        h2.index_add_(0, flat, (lam * (above**2 - below**2)).reshape(-1))
    lowest = steps[-1][2]
    # Σ over weights whose crossing lies beyond grid point j: a reversed cumulative sum
    tail = lambda h: h.view(rows, groups, m + 1).flip(-1).cumsum(-1).flip(-1)[..., 1:]  # noqa: E731
    s1 = lowest * lam_mag.sum(-1, keepdim=True) + tail(h1)
    s2 = lowest**2 * lam.sum(-1, keepdim=True) + tail(h2)
    b = multipliers.double()
    a = a0.double()
    err = (lam_mag * mag.double()).sum(-1, keepdim=True) - 2 * a * b * s1 + (a * b) ** 2 * s2
    return err.clamp(min=0).permute(2, 0, 1).float()


def _grid_counter(multipliers: Tensor) -> Callable[[Tensor], Tensor]:
    """``f(v)`` = how many multipliers are ``≤ 2^v``. An evenly spaced grid (the thesis' is) gets
    it by arithmetic; any other increasing grid by binary search (≈3× slower on the CPU)."""
    steps = multipliers.diff()
    if not bool((steps > 0).all()):
        raise ValueError("multipliers must be increasing")
    first, step, m = float(multipliers[0]), float(steps.mean()), len(multipliers)
    if torch.allclose(steps, torch.full_like(steps, step), rtol=1e-4, atol=0):
        return lambda v: torch.floor((torch.exp2(v) - first) / step + 1).clamp(0, m).long()
    betas = torch.log2(multipliers)
    return lambda v: torch.searchsorted(betas, v, right=True)


ROW_CHUNK = 1024  # rows searched at once: the exact PoT search keeps float64 histograms per group


def search_scales(w: Tensor, fmt: Format, group_size: int, multipliers: Tensor = MULTIPLIERS,
                  column_weight: Tensor | None = None) -> tuple[QParams, Tensor]:
    """The best parameters of every group and the chosen multiplier ``b*`` ``[rows, groups]``."""
    if group_size == PER_TENSOR:
        raise ValueError("the grid search is per group; use a group size or -1 (per channel)")
    if w.shape[0] > ROW_CHUNK:  # rows are independent: the same result, a fraction of the working memory
        parts = [search_scales(rows, fmt, group_size, multipliers, column_weight) for rows in w.split(ROW_CHUNK)]
        zero = None if parts[0][0].zero is None else torch.cat([qp.zero for qp, _ in parts])
        return QParams(torch.cat([qp.scale for qp, _ in parts]), zero), torch.cat([b for _, b in parts])
    multipliers = multipliers.to(w.device)
    errors = group_errors(w, fmt, group_size, multipliers, column_weight)
    best = multipliers[errors.argmin(dim=0)]  # first minimum on ties: the smaller b
    return init_qparams(w, fmt, group_size, clip=best), best


def check_objective(objective: str) -> None:
    """A one-line error for an objective Step 1 does not know (before any work is done)."""
    if objective not in OBJECTIVES:
        raise PotqError(f"unknown objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")


def quantize(model: nn.Module, layers: dict[str, nn.Linear], config: QuantConfig, objective: str = "mse",
             calibration: Tensor | None = None, batch_size: int = 8,
             progress: bool = True) -> dict[str, QuantizedWeight]:
    """Every layer with its grid-searched group scales (thesis Step 1).

    ``objective="mse"`` (the thesis'): plain weight error, no data. ``"act"``: each input
    column's squared error weighted by E[x²] of that column over ``calibration``, measured block
    by block with the earlier blocks already quantized (GPTQ's diagonal): errors on columns that
    see large activations cost more output error.
    """
    check_objective(objective)
    fmt = config.make_format()
    if objective == "mse":
        bar = tqdm(layers.items(), desc=f"grid {fmt!r}", unit="layer", disable=not progress)
        return {name: searched(devices.to_current(layer.weight.detach()), fmt, config.group_size).to(devices.CPU)
                for name, layer in bar}
    if calibration is None:
        raise PotqError("objective 'act' needs calibration data: pass a LoadedModel or calibration=ids")
    result: dict[str, QuantizedWeight] = {}

    def step(_index: int, block: nn.Module, data: BlockData, _targets: list[Tensor]) -> None:
        commit(block, act_searched(block, data, lambda _name: fmt, config.group_size), layers, result)

    run_blockwise(model, calibration, step, batch_size=batch_size, progress=progress)
    return result


def act_searched(block: nn.Module, data: BlockData, format_of: Callable[[str], Format],
                 group_size: int) -> dict[str, QuantizedWeight]:
    """Every linear of ``block`` with its scales searched under the ``act`` objective."""
    moments = input_moments(block, data)
    return {n: searched(m.weight.detach(), format_of(n), group_size, moments.get(n))
            for n, m in block_linears(block).items()}


def quantize_block(job: BlockJob) -> dict[str, QuantizedWeight]:
    """The pipeline's default quantizer stage: Step 1 with the ``act`` objective on one block."""
    return act_searched(job.block, job.data, job.format_of, job.group_size)


def searched(w: Tensor, fmt: Format, group_size: int, column_weight: Tensor | None = None) -> QuantizedWeight:
    """``w`` quantized with its grid-searched scales."""
    return quantize_weight(w, fmt, group_size, search_scales(w, fmt, group_size, column_weight=column_weight)[0])
