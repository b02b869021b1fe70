"""Where the arithmetic runs: ``--device cpu|cuda|auto``.

The model itself stays in CPU memory (a model larger than the GPU, or than RAM when streamed,
still quantizes): the block-wise engine moves one block and its calibration activations to the
chosen device for its turn and back, data-free methods move one weight at a time, QAT moves the
whole model for training, and eval/generate move the model once. Every result handed downstream
(a :class:`potq.formats.weights.QuantizedWeight`) is back on the CPU, so storage never sees a
GPU tensor. The device is a context (:func:`using`), not an argument threaded through every
method: a method's code is the same on both.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import torch

from potq.errors import PotqError

CHOICES = ("cpu", "cuda", "auto")
CPU = torch.device("cpu")
_current: ContextVar[torch.device] = ContextVar("potq_device", default=CPU)


def resolve(name: str | torch.device) -> torch.device:
    """``auto``: the first CUDA GPU when PyTorch sees one, else the CPU; ``cuda`` without a GPU is
    an error (one line), never a silent fall-back to hours on the CPU."""
    if isinstance(name, torch.device):
        return name
    if name not in CHOICES and not name.startswith("cuda:"):
        raise PotqError(f"unknown device {name!r}: choose one of {', '.join(CHOICES)}")
    if name == "cpu" or name == "auto" and not torch.cuda.is_available():
        return CPU
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise PotqError(f"--device {name}: PyTorch sees no CUDA GPU here (torch {torch.__version__}, {build}); "
                        "use --device cpu or auto")
    return torch.device("cuda" if name == "auto" else name)


@contextlib.contextmanager
def using(device: str | torch.device | None) -> Iterator[torch.device]:
    """Run the enclosed quantization on ``device`` (``None``: leave the current one)."""
    if device is None:
        yield _current.get()
        return
    token = _current.set(resolve(device))
    try:
        yield _current.get()
    finally:
        _current.reset(token)


def current() -> torch.device:
    """The device the running quantization computes on (the CPU unless :func:`using` says else)."""
    return _current.get()


def of(module: torch.nn.Module) -> torch.device:
    """Where ``module`` lives: the device of its first tensor in memory (parameters and buffers;
    a lazily loaded model's blocks are on the meta device and do not count); the CPU if none."""
    tensors = itertools.chain(module.parameters(), module.buffers())
    return next((t.device for t in tensors if not t.is_meta), CPU)


def to_current(value: Any) -> Any:
    """``value`` (a tensor, or a list/tuple/dict of them, nested) on the current device."""
    return move(value, current())


def move(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it moved to ``device`` (other values as they are)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: move(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(move(v, device) for v in value)
    return value
