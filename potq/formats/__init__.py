"""Quantization formats: one registry, one interface (:class:`potq.formats.base.Format`).

Adding a format is one new file with a :class:`Format` subclass plus one line in ``FORMATS``.
"""

from __future__ import annotations

from potq.errors import PotqError
from potq.formats.base import Format, QParams
from potq.formats.pot import PoT, PoTWithZero
from potq.formats.uniform import UniformAsym, UniformSym

FORMATS: dict[str, type[Format]] = {
    cls.name: cls for cls in (PoT, PoTWithZero, UniformAsym, UniformSym)
}


def get_format(name: str, bits: int) -> Format:
    """The format called ``name`` at ``bits`` bits, or a one-line error listing the valid names."""
    if name not in FORMATS:
        raise PotqError(f"unknown format {name!r}: choose one of {', '.join(sorted(FORMATS))}")
    return FORMATS[name](bits)


__all__ = ["FORMATS", "Format", "QParams", "get_format"]
