"""Quantization formats: one registry, one interface (:class:`potq.formats.base.Format`).

Adding a format is one new file with a :class:`Format` subclass plus one line in ``FORMATS``.
"""

from __future__ import annotations

import inspect

from potq.errors import PotqError
from potq.formats.apot import AdditivePoT
from potq.formats.base import Format, QParams
from potq.formats.pot import PoT, PoTWithZero
from potq.formats.pot_seed import PoTSeed
from potq.formats.uniform import UniformAsym, UniformSym

FORMATS: dict[str, type[Format]] = {
    cls.name: cls for cls in (PoT, PoTWithZero, PoTSeed, AdditivePoT, UniformAsym, UniformSym)
}


def get_format(name: str, bits: int, **options: float) -> Format:
    """The format called ``name`` at ``bits`` bits, or a one-line error listing the valid names.

    ``options`` are a format's own parameters (``pot-seed``'s ``epsilon``); they change how
    weights are rounded, never how codes decode, so storage needs only name and bits.
    """
    if name not in FORMATS:
        raise PotqError(f"unknown format {name!r}: choose one of {', '.join(sorted(FORMATS))}")
    accepted = set(inspect.signature(FORMATS[name].__init__).parameters) - {"self", "bits"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise PotqError(f"format {name!r} has no option {', '.join(unknown)}; "
                        f"it takes: {', '.join(sorted(accepted)) or 'none'}")
    return FORMATS[name](bits, **options)


__all__ = ["FORMATS", "Format", "QParams", "get_format"]
