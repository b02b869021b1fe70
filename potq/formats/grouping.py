"""Cutting a weight matrix ``[out, in]`` into groups of G input elements per output row.

``group_size`` > 0: groups of G along the input dimension. When G does not divide the row,
the last group of each row is shorter: it is padded with zeros for the arithmetic (zeros change
no group maximum) and the padding is never stored. G larger than the row means one group per row.
``group_size`` = -1: per output channel (one group per row). ``group_size`` = 0: per tensor
(one scale for the whole matrix, broadcast to every row when stored).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from potq.errors import PotqError

PER_CHANNEL, PER_TENSOR = -1, 0


def check_group_size(group_size: int) -> int:
    if not isinstance(group_size, int) or group_size < -1:
        raise PotqError(
            f"group size must be a positive integer, -1 (per channel) or 0 (per tensor), got {group_size!r}"
        )
    return group_size


def group_width(in_features: int, group_size: int) -> int:
    """G actually used for a row of ``in_features`` weights."""
    if group_size in (PER_CHANNEL, PER_TENSOR) or group_size >= in_features:
        return in_features
    return group_size


def num_groups(in_features: int, group_size: int) -> int:
    return math.ceil(in_features / group_width(in_features, group_size))


def to_groups(w: Tensor, group_size: int) -> Tensor:
    """``[out, in]`` -> ``[out, groups, G]``, zero-padding the last group of each row."""
    out_features, in_features = w.shape
    width = group_width(in_features, group_size)
    n = num_groups(in_features, group_size)
    return F.pad(w, (0, n * width - in_features)).reshape(out_features, n, width)


def from_groups(wg: Tensor, in_features: int) -> Tensor:
    """``[out, groups, G]`` -> ``[out, in]``, dropping the padding."""
    return wg.reshape(wg.shape[0], -1)[:, :in_features]


def tensor_wide(wg: Tensor) -> Tensor:
    """All groups of a matrix seen as one group ``[1, 1, out*in]`` (per-tensor statistics)."""
    return wg.reshape(1, 1, -1)


def broadcast_rows(t: Tensor, out_features: int) -> Tensor:
    """A ``[1, 1]`` per-tensor parameter repeated for every row, the layout storage expects."""
    return t.expand(out_features, 1).contiguous()
