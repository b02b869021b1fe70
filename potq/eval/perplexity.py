"""Perplexity with the GPTQ protocol: one token stream, non-overlapping windows, mean NLL.

The whole evaluation text is tokenised once (a BOS is prepended to the stream only when the
tokenizer's model was trained that way, never per window), cut into windows of ``ctx`` tokens with
the tail dropped, and every window predicts its ``ctx - 1`` next tokens from scratch. The
perplexity is ``exp`` of the mean negative log-likelihood over all predicted tokens.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from potq.errors import PotqError
from potq.eval.data import WINDOW_CAP, eval_text
from potq.models import native_decoder

if TYPE_CHECKING:
    from potq.models.tokenizer import Tokenizer

DTYPES = ("bf16", "fp32")
# Rows of logits turned into float32 at a time: bounds the loss's extra memory for big vocabularies.
_LOSS_CHUNK = 512


@dataclass
class PerplexityResult:
    """One perplexity measurement; ``tokens`` counts predicted tokens, ``windows * (ctx - 1)``."""

    dataset: str
    ppl: float
    nll: float
    tokens: int
    windows: int
    total_windows: int
    ctx: int
    seconds: float
    tokens_per_s: float
    dtype: str
    path: str = "pytorch"  # what computed the logits: the PyTorch forward, or the native decoder

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``[batch, seq, vocab]`` logits: transformers models wrap them in ``.logits``, plain
    PyTorch models (a nanoGPT) may return the tensor itself."""
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model can attend over, when its config says so."""
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None)


def model_device(model: nn.Module) -> torch.device:
    from potq.devices import of

    return of(model)


def nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed cross-entropy of ``[seq, vocab]`` logits against ``[seq]`` targets, in float32,
    a chunk of rows at a time so no full float32 copy of a large-vocabulary logit matrix exists."""
    total = 0.0
    for start in range(0, targets.numel(), _LOSS_CHUNK):
        rows = slice(start, start + _LOSS_CHUNK)
        total += F.cross_entropy(logits[rows].float(), targets[rows], reduction="sum").item()
    return total


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX) rather than emulating it."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """``"auto"`` -> ``"bf16"`` where bf16 is native (CUDA, CPUs with AVX512-BF16 or AMX), else
    ``"fp32"``: on CPUs without native bf16, autocast emulates it and runs 2-6x *slower* than
    float32 (measured on this project's 2-core AVX-512 machines), for the same perplexity."""
    if dtype == "auto":
        native = device.type == "cuda" or cpu_native_bf16()
        return "bf16" if native else "fp32"
    if dtype not in DTYPES:
        raise PotqError(f"unknown dtype {dtype!r}: choose one of auto, {', '.join(DTYPES)}")
    return dtype


def _precision(dtype: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast or plain float32 (``dtype`` already resolved)."""
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _check_ctx(model: nn.Module, ctx: int) -> None:
    if ctx < 2:
        raise PotqError(f"--ctx must be at least 2 tokens (got {ctx})")
    limit = max_positions(model)
    if limit is not None and ctx > limit:
        raise PotqError(f"--ctx {ctx} exceeds the model's {limit} positions: lower --ctx")


def _windows(ids: list[int], ctx: int, cap: int | None, max_windows: int | None,
             device: torch.device) -> tuple[torch.Tensor, int]:
    """The windows to evaluate ``[n, ctx]`` and how many the (capped) text holds in all."""
    total = len(ids) // ctx
    if total == 0:
        raise PotqError(f"the text has {len(ids)} tokens, fewer than one window of {ctx}: "
                        "lower --ctx")
    if cap is not None:
        total = min(total, cap)
    count = total if max_windows is None else min(total, max_windows)
    stream = torch.tensor(ids[:count * ctx], dtype=torch.long, device=device)
    return stream.view(count, ctx), total


def _native_forward(model: nn.Module, ctx: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A window's logits through the native decoder (what ``potq generate`` computes, 8-bit
    activations included), or None where it cannot run the model."""
    if native_decoder.unsupported(model) is not None:
        return None
    decoder = native_decoder.NativeDecoder(model, ctx)
    return decoder.every_logits


def perplexity(model: nn.Module, tokenizer: Tokenizer, dataset: str, ctx: int = 2048,
               max_windows: int | None = None, dtype: str = "auto", progress: bool = True,
               text: str | None = None, native: bool = False) -> PerplexityResult:
    """Perplexity of ``model`` on ``dataset`` (see :data:`potq.eval.DATASETS`).

    ``native``: the windows go through the native decoder (:mod:`potq.models.native_decoder`) —
    the perplexity of what ``potq generate`` computes, its 8-bit activations included — instead
    of the PyTorch forward.

    ``text`` replaces the data set's text (``dataset`` is then only a label and C4's 256-window
    cap does not apply). ``max_windows`` evaluates only the first windows, for quick checks.
    ``seconds`` and ``tokens_per_s`` time the model alone (tokenisation excluded), counting every
    token fed through it. The model is put in eval mode.
    """
    if max_windows is not None and max_windows < 1:
        raise PotqError(f"--max-windows must be at least 1 (got {max_windows})")
    _check_ctx(model, ctx)
    device = model_device(model)
    dtype = "fp32" if native else resolve_dtype(dtype, device)  # the native decoder computes in float32
    precision = _precision(dtype, device)
    cap = None if text is not None else WINDOW_CAP.get(dataset)
    ids = tokenizer.encode(eval_text(dataset) if text is None else text)
    windows, total = _windows(ids, ctx, cap, max_windows, device)

    model.eval()
    nll = 0.0
    start = time.perf_counter()
    bar = tqdm(windows, desc=f"ppl {dataset}", unit="win", disable=not progress)
    forward = _native_forward(model, ctx) if native else lambda window: logits_of(model, window)[0]
    if native and forward is None:
        raise PotqError(f"--kernel native: {native_decoder.unsupported(model)}")
    with torch.inference_mode(), precision:
        for done, window in enumerate(bar, 1):
            logits = forward(window[None])
            nll += nll_sum(logits[:-1], window[1:])
            del logits  # at most one window's logits alive at a time
            bar.set_postfix(tok_s=f"{done * ctx / (time.perf_counter() - start):.0f}")
    seconds = time.perf_counter() - start

    tokens = windows.shape[0] * (ctx - 1)
    mean = nll / tokens  # a perplexity past exp(709) is reported as inf, not an OverflowError
    return PerplexityResult(
        dataset=dataset, ppl=math.exp(mean) if mean < 709 else math.inf, nll=mean, tokens=tokens,
        windows=windows.shape[0], total_windows=total, ctx=ctx, seconds=seconds,
        tokens_per_s=windows.shape[0] * ctx / seconds, dtype=dtype, path="native" if native else "pytorch",
    )
