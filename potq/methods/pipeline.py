"""A method as a short pipeline of stages on the shared block-wise engine: ``--method awq,blockap,e2e``.

Three kinds of stage, run in this order whatever order they are named in:

* **transforms** turn each float block into an equivalent one that rounds better (``awq``: the
  input channels that see large activations scaled up, the inverse folded into the layer before);
* one **quantizer** decides the block's codes and scales (``grid``: Step 1's activation-weighted
  scale search; ``blockap``: weights and scales trained together); without one, ``grid``;
* **model stages** run once every block is packed, on the whole model (``e2e``: the scales tuned
  on the next-token loss).

A stage is one file with one function, registered here in one line; its keyword arguments are
its settings, which become the pipeline's (recorded in potq.json) — no two stages share a name.
"""

from __future__ import annotations

import inspect
import time
from typing import Any, Callable, NamedTuple

from torch import Tensor, nn

from potq.config import QuantConfig
from potq.engine.blocks import BlockData, BlockJob, commit, run_blockwise
from potq.engine.trainer import note_block
from potq.errors import PotqError
from potq.formats import Format
from potq.formats.weights import QuantizedWeight
from potq.methods import awq, blockap, e2e, grid

KINDS = ("transform", "quantizer", "model")


class Stage(NamedTuple):
    kind: str  # one of KINDS
    run: Callable  # transform: (job, **s) -> None; quantizer: (job, **s) -> {name: QuantizedWeight};
    # model: (model, layers, result, config, calibration, progress, **s) -> report


STAGES: dict[str, Stage] = {
    "awq": Stage("transform", awq.transform_block),
    "grid": Stage("quantizer", grid.quantize_block),
    "blockap": Stage("quantizer", blockap.quantize_block),
    "e2e": Stage("model", e2e.tune),
}
_GIVEN = {"job", "model", "layers", "result", "config", "calibration", "progress", "formats"}  # inputs, not settings


def parse(spec: str) -> list[str]:
    """``"awq,blockap,e2e"`` -> its stages in running order, or a one-line error."""
    names = [n.strip() for n in spec.split(",")]
    unknown = [n for n in names if n not in STAGES]
    if unknown or len(set(names)) != len(names):
        what = f"unknown stage {unknown[0]!r}" if unknown else "a stage named twice"
        raise PotqError(f"method {spec!r}: {what}; a pipeline joins stages with commas, from "
                        f"{', '.join(STAGES)} (at most one quantizer: grid or blockap)")
    if sum(STAGES[n].kind == "quantizer" for n in names) > 1:
        raise PotqError(f"method {spec!r}: at most one quantizer stage (grid or blockap)")
    if not any(STAGES[n].kind == "quantizer" for n in names):
        names.append("grid")
    return sorted(names, key=lambda n: KINDS.index(STAGES[n].kind))


def _settings_of(run: Callable) -> list[inspect.Parameter]:
    return [p for name, p in inspect.signature(run).parameters.items() if name not in _GIVEN]


def _own(run: Callable, settings: dict[str, Any]) -> dict[str, Any]:
    return {p.name: settings[p.name] for p in _settings_of(run) if p.name in settings}


def build(spec: str) -> Callable:
    """The method function of pipeline ``spec``: ``(model, layers, config, calibration, **settings)``."""
    names = parse(spec)
    stages = [STAGES[n] for n in names]

    def run(model: nn.Module, layers: dict[str, nn.Linear], config: QuantConfig, calibration: Tensor,
            batch_size: int = 4, formats: dict[str, Format] | None = None, progress: bool = True,
            **settings: Any) -> dict[str, QuantizedWeight]:
        """``formats``: a grid per linear (by its name in the model) other than ``config``'s."""
        fmt = config.make_format()
        by_module = {id(layers[name]): f for name, f in (formats or {}).items()}
        for p in model.parameters():
            p.requires_grad_(False)
        result: dict[str, QuantizedWeight] = {}
        blocks: list[dict[str, Any]] = []
        report: dict[str, Any] = {"settings": {"stages": names, "batch_size": batch_size, **settings},
                                  "blocks": blocks}
        model.potq_report = report

        def step(index: int, block: nn.Module, data: BlockData, targets: list[Tensor]) -> None:
            started = time.perf_counter()
            own = {n: by_module[id(m)] for n, m in block.named_modules() if id(m) in by_module}
            job = BlockJob(index, block, data, targets, fmt, config.group_size, {"block": index}, progress, own)
            chosen: dict[str, QuantizedWeight] = {}
            for stage in stages:
                if stage.kind == "transform":
                    stage.run(job, **_own(stage.run, settings))
                elif stage.kind == "quantizer":
                    chosen = stage.run(job, **_own(stage.run, settings))
            commit(block, chosen, layers, result)
            job.report["seconds"] = time.perf_counter() - started
            blocks.append(job.report)
            if progress and "loss" in job.report:
                note_block(index, job.report["loss"], job.report["seconds"], job.report.get("diverged", False))

        run_blockwise(model, calibration, step, batch_size=batch_size, progress=progress)
        for name, stage in zip(names, stages):
            if stage.kind == "model":
                report[name] = stage.run(model, layers, result, config, calibration, progress=progress,
                                         **_own(stage.run, settings))
        return result

    run.staged = True  # takes a grid per layer (a bit budget)
    params = inspect.signature(run).parameters
    extra: dict[str, inspect.Parameter] = {}
    for stage in stages:
        for p in _settings_of(stage.run):
            if p.name in extra or p.name in params:
                raise ValueError(f"stages of {spec!r} share the setting {p.name!r}")
            extra[p.name] = p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
    fixed = [p for name, p in params.items() if name != "settings"]
    run.__signature__ = inspect.Signature([*fixed[:4], *[p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
                                                         for p in fixed[4:]], *extra.values()])
    return run


def has_model_stage(spec: str) -> bool:
    return any(STAGES[n].kind == "model" for n in parse(spec))
