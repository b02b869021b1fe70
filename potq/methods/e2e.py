"""End-to-end scale tuning (after EfficientQAT's E2E-QP): once every block is packed, the group
scales — and only they — are trained on the whole model's next-token loss over the calibration
text.

The block-wise stages each fit one block to the float block's output; errors still add up along
the 30 blocks, and a block's output error is not what the model is judged on. Here the codes are
fixed, so each weight matrix is ``W = U ⊙ ŝ`` with ``U`` the codes decoded at unit scale — every
format's value is linear in its group scale (PoT ``±s·2^e``, uniform ``(q − z)·s``) — and the
trainable tensors are one factor per group, ``ŝ = s·(1 + Γ)``, rounded to fp16 in the forward pass
as storage will: the packed result decodes exactly to what was trained. It is cheap in memory
(Adam's moments for the scales only, a thousandth of the weights) and runs on potq's one
training loop (warm-up and cosine schedule, the validation-best step kept: the last tenth of
the calibration windows is held out).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from potq import devices
from potq.config import QuantConfig
from potq.formats import QParams
from potq.formats.grouping import from_groups, to_groups
from potq.formats.weights import QuantizedWeight, dequantize
from potq.methods.qat import window_sampler
from potq.train.loop import TrainSettings, train


class ScaledCodes(nn.Module):
    """A linear layer with fixed codes whose group scales are trainable."""

    def __init__(self, qw: QuantizedWeight, bias: Tensor | None) -> None:
        super().__init__()
        self.qw = qw.unpacked() if hasattr(qw, "unpacked") else qw
        qp = self.qw.qparams()
        self.register_buffer("unit", dequantize(self.qw.codes, QParams(torch.ones_like(qp.scale), qp.zero),
                                                self.qw.fmt, self.qw.group_size))
        self.register_buffer("scale0", qp.scale)
        self.bias = bias
        self.gamma = nn.Parameter(torch.zeros_like(qp.scale))

    def scale(self) -> Tensor:
        """The trained scales as fp16 storage holds them (the cast passes the gradient through)."""
        return self.qw.fmt.as_stored(QParams(self.scale0 * (1 + self.gamma))).scale

    def forward(self, x: Tensor) -> Tensor:
        width = self.unit.shape[1]
        w = from_groups(to_groups(self.unit, self.qw.group_size) * self.scale().unsqueeze(-1), width)
        return F.linear(x, w.to(x.dtype), self.bias)

    def quantized(self) -> QuantizedWeight:
        with torch.no_grad():
            return QuantizedWeight(self.qw.fmt, self.qw.group_size, self.qw.codes,
                                   self.qw.fmt.store_scale(self.scale()), self.qw.zero)


def tune(model: nn.Module, layers: dict[str, nn.Linear], result: dict[str, QuantizedWeight], config: QuantConfig,
         calibration: Tensor, progress: bool = True, e2e_steps: int = 0, e2e_lr: float = 1e-2,
         e2e_batch_size: int = 1) -> dict:
    """Train every packed layer's scales in ``result`` (replaced in place) on ``calibration``;
    ``e2e_steps`` 0 means one pass over the training windows. Returns the training record."""
    train_windows = len(calibration) - max(1, int(len(calibration) * 0.1))
    steps = e2e_steps or max(1, train_windows // e2e_batch_size)
    home = devices.of(model)
    model.to(devices.current())
    wrapped = {name: ScaledCodes(result[name].to(devices.current()), layers[name].bias) for name in result}
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in wrapped.items():
        model.set_submodule(name, layer)
    settings = TrainSettings(steps=steps, lr=e2e_lr, warmup=max(1, steps // 10), weight_decay=0.0,
                             eval_every=max(1, steps // 4), eval_batches=4, keep_best=True)
    try:
        record = train(model, window_sampler(calibration.to(devices.current()), e2e_batch_size), settings,
                       progress=progress)
        for name, layer in wrapped.items():
            result[name] = layer.quantized().to(devices.CPU).compact()
            with torch.no_grad():
                layers[name].weight.copy_(result[name].dequantize().to(layers[name].weight))
    finally:  # the caller swaps in packed layers by name: never leave wrappers behind
        for name, layer in layers.items():
            model.set_submodule(name, layer)
        model.to(home)
    model.eval()
    return {"steps": steps, "lr": e2e_lr, "batch_size": e2e_batch_size, "training": record.to_dict()}
