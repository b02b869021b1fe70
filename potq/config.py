"""What to quantize to: format, bits and group size, validated once, in the torchao style.

``potq.quantize_(model, PoTConfig(bits=3, group_size=128))`` — a config says *what* grid the
weights land on; the method (``rtn``, …) says *how* the scales are chosen.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from potq.formats import Format, get_format
from potq.formats.grouping import check_group_size


@dataclass(frozen=True)
class QuantConfig:
    """Any registered format (``potq.formats.FORMATS``) at ``bits`` bits, groups of ``group_size``
    input elements (-1: per output channel, 0: per tensor); ``options`` are the format's own
    parameters (e.g. ``{"epsilon": 1e-6}`` for ``pot-seed``)."""

    format: str = "pot"
    bits: int = 4
    group_size: int = 128
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.make_format()  # raises a one-line PotqError for a bad name or bit width
        check_group_size(self.group_size)

    def make_format(self) -> Format:
        return get_format(self.format, self.bits, **self.options)

    def to_dict(self) -> dict:
        return asdict(self)


class PoTConfig(QuantConfig):
    """Power-of-two weights; ``zero=True`` selects the grid with a zero level."""

    def __init__(self, bits: int = 4, group_size: int = 128, zero: bool = False) -> None:
        super().__init__("pot-zero" if zero else "pot", bits, group_size)


class UniformConfig(QuantConfig):
    """Uniform integer weights, asymmetric (zero point per group) unless ``symmetric``."""

    def __init__(self, bits: int = 4, group_size: int = 128, symmetric: bool = False) -> None:
        super().__init__("uniform-sym" if symmetric else "uniform", bits, group_size)
