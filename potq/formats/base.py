"""The one quantizer interface: every method, the storage, the kernels and QAT go through it.

A :class:`Format` knows its grid of levels and nothing about models. It works on *grouped*
weights ``wg`` of shape ``[rows, groups, G]`` (see :mod:`potq.formats.grouping`) with one scale
(and, for affine formats, one zero point) per group, shape ``[rows, groups]``.

Codes are small unsigned integers in ``[0, 2**bits)`` — what gets bit-packed on disk. The
float-to-code rounding lives in exactly one place per format (:meth:`Format.exponent_or_level`),
and :meth:`Format.fake_quant` reuses it with a pluggable rounding so that plain rounding,
the straight-through estimator and the "detached codes" gradient all share one formula.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar, Literal

import torch
from torch import Tensor

from potq.errors import PotqError
from potq.formats.grouping import num_groups
from potq.formats.packing import packed_row_bytes

MIN_BITS, MAX_BITS = 2, 8
FP16_TINY, FP16_MAX = 2.0**-24, 65504.0  # smallest positive subnormal and largest finite fp16
Grad = Literal["none", "ste", "detach", "lsq"]
Rounding = Callable[[Tensor], Tensor]


def round_ste(x: Tensor) -> Tensor:
    """Round in the forward pass, identity in the backward pass (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def round_detached(x: Tensor) -> Tensor:
    """Round and cut the graph: the integer codes are constants for the backward pass, so the
    gradient reaches only the scale (LSQ-like ``d w~/d s = q``)."""
    return torch.round(x).detach()


ROUNDINGS: dict[str, Rounding] = {"none": torch.round, "ste": round_ste, "detach": round_detached}


@dataclass
class QParams:
    """Per-group quantization parameters, each ``[rows, groups]`` float32.

    ``zero`` holds integer values (the code that decodes to 0.0) for affine formats, else None.
    """

    scale: Tensor
    zero: Tensor | None = None

    def map(self, fn: Callable[[Tensor], Tensor]) -> "QParams":
        return QParams(fn(self.scale), None if self.zero is None else fn(self.zero))


class Format(ABC):
    """A grid of ``2**bits`` codes, scaled per group.

    Subclasses define the grid; this base class supplies the parts every format shares (bit
    checks, fp16 scale storage, fake quantization, bits-per-weight accounting).
    """

    name: ClassVar[str]
    has_zero: ClassVar[bool] = False  # stores an integer zero point per group (uint8)
    # rounds in the log domain (PoT): the literal straight-through gradient to the scale cancels
    # there (ŝ·2^log2(|w|/ŝ) = |w|), so scale-learning methods hold the codes instead ("detach")
    log_rounding: ClassVar[bool] = False
    min_bits: ClassVar[int] = MIN_BITS
    max_bits: ClassVar[int] = MAX_BITS

    def __init__(self, bits: int) -> None:
        if not isinstance(bits, int) or not self.min_bits <= bits <= self.max_bits:
            raise PotqError(f"{self.name} bits must be an integer from {self.min_bits} to {self.max_bits}, got {bits!r}")
        self.bits = bits

    def __repr__(self) -> str:
        return f"{self.name}{self.bits}"

    def __eq__(self, other: object) -> bool:
        """The same grid: the same kind with the same settings (a format read back from a file
        equals the one the layer was quantized with)."""
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(vars(self).items()))))

    # --- what each format defines -------------------------------------------------------
    @abstractmethod
    def init_qparams(self, wg: Tensor, clip: Tensor | float = 1.0,
                     clip_low: Tensor | float | None = None) -> QParams:
        """Scales (and zeros) that make the grid span ``clip`` times the group's range.

        ``clip`` (scalar or ``[rows, groups]``) is the multiplier b of a grid search: every
        scale-search method works through this one knob, whatever the format. ``clip_low``
        clips the negative end separately (OmniQuant's two clipping strengths); only affine
        formats have a separate negative end, the others ignore it.
        """

    @abstractmethod
    def exponent_or_level(self, wg: Tensor, qp: QParams, rnd: Rounding) -> Tensor:
        """The rounded grid index of each weight (exponent for PoT, integer level for uniform),
        rounded with ``rnd`` so gradients can pass straight through."""

    @abstractmethod
    def value_of(self, index: Tensor, wg_sign: Tensor, qp: QParams) -> Tensor:
        """The float weight of a grid index (the inverse of :meth:`exponent_or_level`)."""

    @abstractmethod
    def to_code(self, index: Tensor, wg_sign: Tensor, qp: QParams) -> Tensor:
        """Pack a grid index (and sign) into an unsigned code in ``[0, 2**bits)``."""

    @abstractmethod
    def from_code(self, codes: Tensor, qp: QParams) -> tuple[Tensor, Tensor]:
        """Unpack codes into ``(index, sign)`` as float tensors for :meth:`value_of`."""

    def magnitude_steps(self) -> list[tuple[float, float, float]] | None:
        """For grids of sign × magnitude whose scale is the largest level: every step down of a
        weight's magnitude level as ``|w|/a`` falls, largest first, as ``(log2 |w|/a at which it
        steps, level above, level below)`` in units of ``a`` — what the grid search's exact
        shortcut needs (:func:`potq.methods.grid.stepped_errors`). None for other grids."""
        return None

    # --- shared behaviour ----------------------------------------------------------------
    def sign(self, w: Tensor) -> Tensor:
        """The sign each weight is coded with (:func:`sign_of`; a format with a signed zero overrides)."""
        return sign_of(w)

    def store_scale(self, scale: Tensor) -> Tensor:
        """The scale as written to disk: fp16, kept inside fp16's finite positive range."""
        return scale.clamp(FP16_TINY, FP16_MAX).to(torch.float16)

    def load_scale(self, stored: Tensor) -> Tensor:
        """The float32 scale a stored fp16 scale stands for."""
        return stored.to(torch.float32)

    def as_stored(self, qp: QParams) -> QParams:
        """``qp`` rounded through storage, so codes are computed with the scale decode will see.

        The gradient passes the rounding straight through, in float32: through the cast itself it
        would be rounded to fp16 too, and on a model with large activations (Gemma-3's) a group's
        summed scale gradient overflows fp16 and the training turns NaN."""
        stored = self.load_scale(self.store_scale(qp.scale.detach()))
        return QParams(stored + (qp.scale - qp.scale.detach()), qp.zero)

    def encode(self, wg: Tensor, qp: QParams) -> Tensor:
        """Codes (uint8) of grouped weights ``[rows, groups, G]``."""
        index = self.exponent_or_level(wg, _expand(qp), torch.round)
        return self.to_code(index, self.sign(wg), _expand(qp)).to(torch.uint8)

    def decode(self, codes: Tensor, qp: QParams) -> Tensor:
        """Float32 weights ``[rows, groups, G]`` of codes."""
        qpe = _expand(qp)
        index, sign = self.from_code(codes.to(torch.int32), qpe)
        return self.value_of(index, sign, qpe)

    def fake_quant(self, wg: Tensor, qp: QParams, grad: Grad = "none") -> Tensor:
        """Quantize-dequantize in float.

        ``grad="none"`` plain rounding (equals ``decode(encode(wg))``); ``"ste"`` passes the
        rounding straight through (thesis eq. 3.16); ``"detach"`` holds the rounded index
        constant, so only the scale receives a gradient; ``"lsq"`` (QAT with learned scales) gives
        the weights the straight-through gradient and the scale the held-index one, by reading
        the index off a detached scale.
        """
        qpe = _expand(qp)
        sign = self.sign(wg)
        if grad == "lsq":
            index = self.exponent_or_level(wg, qpe.map(Tensor.detach), round_ste)
        else:
            index = self.exponent_or_level(wg, qpe, ROUNDINGS[grad])
        return self.value_of(index, sign, qpe)

    def levels(self, qp: QParams) -> Tensor:
        """Every value each group can represent, ``[rows, groups, 2**bits]`` (tests, plots)."""
        rows, groups = qp.scale.shape
        codes = torch.arange(2**self.bits, device=qp.scale.device).expand(rows, groups, -1)
        return self.decode(codes, qp)

    def bits_per_weight(self, group_size: int) -> float:
        """Storage cost per weight of a row of whole groups: code + fp16 scale (+ uint8 zero)."""
        return self.bits + (16 + (8 if self.has_zero else 0)) / group_size

    def stored_bytes(self, rows: int, cols: int, group_size: int) -> int:
        """Bytes an ``[rows, cols]`` layer takes on disk: byte-padded packed code rows, an fp16
        scale (and a uint8 zero) for every group, the ragged last one included."""
        return rows * (packed_row_bytes(cols, self.bits) + num_groups(cols, group_size) * (3 if self.has_zero else 2))


def sign_of(w: Tensor) -> Tensor:
    """-1 for negative weights, +1 otherwise: a zero weight gets the positive sign bit, so sign
    formats that have no zero level (zero-excluded PoT) still map it somewhere definite."""
    return torch.where(w < 0, -1.0, 1.0).to(w.dtype)


def _expand(qp: QParams) -> QParams:
    """Give ``[rows, groups]`` parameters a trailing axis so they broadcast over ``G``."""
    return qp.map(lambda t: t.unsqueeze(-1))
