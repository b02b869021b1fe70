"""Quantization methods: each decides the codes and scales of the layers it is given.

A method is a function ``(model, layers, config, **settings) -> {name: QuantizedWeight}``;
data-dependent ones also take ``calibration`` (token ids ``[N, L]``). Adding a method is a new
file plus one line in ``METHODS``; adding a stage of a staged method (``awq,blockap,e2e``, see
:mod:`potq.methods.pipeline`) is a new file plus one line in ``pipeline.STAGES``.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, NamedTuple

from potq.errors import PotqError
from potq.methods import awq, gptq, grid, omniquant, pipeline, qat, rtn, twostep


def _never(_settings: dict[str, Any]) -> bool:
    return False


def _always(_settings: dict[str, Any]) -> bool:
    return True


class Method(NamedTuple):
    run: Callable
    needs_calibration: Callable[[dict[str, Any]], bool] = _never  # given the method's settings
    whole_model: bool = False  # trains the whole model at once (QAT), not block by block

    def blockwise(self, settings: dict[str, Any]) -> bool:
        """Whether it runs on the block-wise engine, one block at a time (so it can stream)."""
        return self.needs_calibration(settings) and not self.whole_model


METHODS: dict[str, Method] = {
    "rtn": Method(rtn.quantize),
    "grid": Method(grid.quantize, lambda settings: settings.get("objective") == "act"),
    "twostep": Method(twostep.quantize, _always),
    "finetune": Method(partial(twostep.quantize, init="rtn"), _always),  # Step 2 alone: the ablation
    "gptq": Method(gptq.quantize, _always),
    "awq": Method(awq.quantize, _always),
    "omniquant": Method(omniquant.quantize, _always),  # learnable weight clipping (LWC)
    "qat": Method(qat.quantize, _always, whole_model=True),  # quantization-aware training on the calibration text
    "blockap": Method(pipeline.build("blockap"), _always),  # block-wise training of weights and scales
}


def get_method(name: str, staged: bool = False) -> Method:
    """A registered method, or a pipeline of stages joined by commas (``"awq,blockap,e2e"``);
    ``staged``: a name that is both a method and a stage (``grid``, ``awq``) means the stage,
    the form that takes a grid per layer (a bit budget)."""
    if name in METHODS and not (staged and name in pipeline.STAGES):
        return METHODS[name]
    if "," in name or name in pipeline.STAGES:
        return Method(pipeline.build(name), _always, whole_model=pipeline.has_model_stage(name))
    raise PotqError(f"unknown method {name!r}: choose one of {', '.join(sorted(METHODS))}, "
                    f"or stages joined by commas from {', '.join(pipeline.STAGES)}")
