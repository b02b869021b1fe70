"""Quantization methods: each decides the codes and scales of the layers it is given.

A method is a function ``(model, layers, config, **settings) -> {name: QuantizedWeight}``;
data-dependent ones also take ``calibration`` (token ids ``[N, L]``). Adding a method is a new
file plus one line in ``METHODS``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from potq.errors import PotqError
from potq.methods import grid, rtn, twostep


class Method(NamedTuple):
    run: Callable
    needs_calibration: bool = False


METHODS: dict[str, Method] = {
    "rtn": Method(rtn.quantize),
    "grid": Method(grid.quantize),
    "twostep": Method(twostep.quantize, needs_calibration=True),
    "finetune": Method(twostep.quantize_finetune, needs_calibration=True),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise PotqError(f"unknown method {name!r}: choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]
