"""PoT quantization-aware training (PoT-QAT): train the model through its quantized weights.

Every quantized linear becomes a :class:`FakeQuantLinear` for the run: it keeps the float master
weight, and its forward pass uses the one format's ``fake_quant`` of it — the codes a packed
layer would decode — with the rounding passed straight through to the master weight. The group
scales start from Step 1 of the two-step method (the grid search) and are either ``frozen`` there
or ``learned`` as ``s·(1 + Γ)`` with the held-index (LSQ-like) gradient, like Step 2 but trained
on the language-model loss of the whole model. The rest of the model (norms, embeddings) trains
in float. At the end each layer is quantized with its final scales — exactly what its forward
pass computed, fp16 scale rounding included — and handed back like any post-training method's
result, so the saved folder is the same format and evaluates the same as the QAT forward.

Training text is the model's calibration text (C4's calibration half, or a char model's train
split), ``calib_samples`` windows of ``calib_len`` tokens from which each step draws a batch; it
never overlaps the evaluation text. The loop is :func:`potq.train.loop.train` (AdamW, warm-up +
cosine, gradient clipping, loss estimates, checkpoint + resume, progress with loss and tokens/s).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from potq import devices
from potq.config import QuantConfig
from potq.errors import PotqError
from potq.formats import Format, QParams
from potq.formats.grouping import PER_TENSOR
from potq.formats.weights import QuantizedWeight, fake_quantize, init_qparams, quantize_weight
from potq.methods.grid import search_scales
from potq.train.loop import TrainSettings, train

SCALES = ("frozen", "learned")


class FakeQuantLinear(nn.Module):
    """A linear layer computing with the fake-quantized view of its float master weight."""

    def __init__(self, linear: nn.Linear, fmt: Format, group_size: int, qp: QParams, learn_scale: bool) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias  # the same Parameters: trained in place
        self.fmt, self.group_size = fmt, group_size
        self.register_buffer("scale0", qp.scale.detach().clone())
        self.register_buffer("zero", None if qp.zero is None else qp.zero.detach().clone())
        self.gamma = nn.Parameter(torch.zeros_like(self.scale0)) if learn_scale else None

    def qparams(self) -> QParams:
        """The scales as storage will hold them (fp16-rounded, differentiably) for Γ's current value."""
        scale = self.scale0 if self.gamma is None else self.scale0 * (1 + self.gamma)
        return self.fmt.as_stored(QParams(scale, self.zero))

    def forward(self, x: Tensor) -> Tensor:
        grad = "ste" if self.gamma is None else "lsq"
        w = fake_quantize(self.weight, self.fmt, self.group_size, self.qparams(), grad)
        return F.linear(x, w, self.bias)

    def quantized(self) -> QuantizedWeight:
        with torch.no_grad():
            return quantize_weight(self.weight.detach(), self.fmt, self.group_size, self.qparams().map(Tensor.detach))


def starting_scales(w: Tensor, fmt: Format, group_size: int) -> QParams:
    """Step 1's grid-searched scales (round-to-nearest ones for a per-tensor scale)."""
    if group_size == PER_TENSOR:
        return init_qparams(w, fmt, group_size)
    return search_scales(w, fmt, group_size)[0]


def window_sampler(pool: Tensor, batch_size: int, val_fraction: float = 0.1):
    """``(split, rng) -> (x, y)`` drawing ``batch_size`` windows of ``pool`` (``[N, L]`` ids): the
    last ``val_fraction`` of the windows are held out for the loss estimate."""
    n_val = max(1, int(len(pool) * val_fraction))
    if len(pool) - n_val < 1:
        raise PotqError(f"QAT needs at least 2 training windows, got {len(pool)}: raise --calib-samples")
    splits = {"train": pool[:-n_val], "val": pool[-n_val:]}

    def batch(split: str, rng: torch.Generator) -> tuple[Tensor, Tensor]:
        rows = splits[split][torch.randint(len(splits[split]), (batch_size,), generator=rng)]
        return rows[:, :-1], rows[:, 1:]

    return batch


def quantize(model: nn.Module, layers: dict[str, nn.Linear], config: QuantConfig, calibration: Tensor | None = None,
             steps: int = 200, lr: float = 1e-4, batch_size: int = 8, scales: str = "learned",
             weight_decay: float = 0.0, seed: int = 0, state_dir: str | None = None,
             progress: bool = True) -> dict[str, QuantizedWeight]:
    """Train ``model`` with ``layers`` fake-quantized for ``steps`` steps; their quantized weights.

    ``state_dir`` keeps a checkpoint there so an interrupted run resumes (the caller removes it).
    """
    if scales not in SCALES:
        raise PotqError(f"unknown scales {scales!r}: choose one of {', '.join(SCALES)}")
    if calibration is None:
        raise PotqError("QAT needs training text: pass a LoadedModel or calibration=ids")
    if batch_size < 1:
        raise PotqError(f"batch_size must be at least 1, got {batch_size}")
    fmt = config.make_format()
    home = devices.of(model)
    model.to(devices.current())  # QAT trains the whole model: all of it goes to the device
    wrapped = {}
    for name, layer in layers.items():
        qp = starting_scales(layer.weight.detach(), fmt, config.group_size)
        wrapped[name] = FakeQuantLinear(layer, fmt, config.group_size, qp, learn_scale=scales == "learned")
        model.set_submodule(name, wrapped[name])
    settings = TrainSettings(steps=steps, lr=lr, warmup=max(1, min(100, steps // 10)), weight_decay=weight_decay,
                             eval_every=max(1, steps // 10), eval_batches=4, seed=seed,
                             keep_best=True)
    try:
        result = train(model, window_sampler(calibration.to(devices.current()), batch_size), settings,
                       state_dir=Path(state_dir) if state_dir else None, progress=progress)
        quantized = {name: layer.quantized().to(devices.CPU) for name, layer in wrapped.items()}
    finally:  # the caller swaps in packed layers by name; never leave wrappers behind on failure
        for name, layer in layers.items():
            model.set_submodule(name, layer)
        model.to(home)
    model.eval()
    model.potq_report = {"settings": {"scales": scales, "steps": steps, "lr": lr, "batch_size": batch_size},
                         "training": result.to_dict()}
    return quantized
