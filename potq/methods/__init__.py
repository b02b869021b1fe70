"""Quantization methods: each decides the codes and scales of the layers it is given.

A method is a function ``(model, layers, config, **settings) -> {name: QuantizedWeight}``;
adding one is a new file plus one line in ``METHODS``.
"""

from __future__ import annotations

from typing import Callable

from potq.errors import PotqError
from potq.methods import grid, rtn

METHODS: dict[str, Callable] = {
    "rtn": rtn.quantize,
    "grid": grid.quantize,
}


def get_method(name: str) -> Callable:
    if name not in METHODS:
        raise PotqError(f"unknown method {name!r}: choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]
