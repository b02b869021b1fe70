"""One training loop for everything potq trains: the char nanoGPT from scratch, and QAT.

nanoGPT's recipe: AdamW (weight decay on matrices only), linear warm-up then cosine decay to a
tenth of the peak rate, gradient clipping, a periodic estimate of the train and validation loss
on fixed batches. Two things make long CPU runs safe to interrupt:

* every step's batch and dropout come from ``seed + step``, so a resumed run draws exactly the
  batches the uninterrupted run would have drawn — no RNG state to save;
* the checkpoint (weights, Adam moments, step, loss history) is one safetensors file plus one JSON
  file in ``state_dir``, each written to a temporary name and renamed; nothing is pickled.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm import tqdm

from potq.errors import PotqError
from potq.eval.perplexity import logits_of

Batch = Callable[[str, torch.Generator], tuple[Tensor, Tensor]]  # (split, rng) -> (inputs, targets)
STATE_WEIGHTS, STATE_JSON = "state.safetensors", "state.json"


@dataclass(frozen=True)
class TrainSettings:
    """What a run computes; a checkpoint resumes only under the same settings."""

    steps: int
    lr: float = 1e-3
    warmup: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_every: int = 500
    eval_batches: int = 20
    seed: int = 0
    keep_best: bool = False  # end with the weights of the lowest validation-loss estimate

    def __post_init__(self) -> None:
        if self.steps < 1 or self.lr <= 0 or self.eval_every < 1 or self.eval_batches < 1:
            raise PotqError(f"steps, lr, eval_every and eval_batches must be positive (got {self})")

    def lr_at(self, step: int) -> float:
        """Linear warm-up for ``warmup`` steps, then cosine from ``lr`` down to ``lr·min_lr_ratio``."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        floor = self.lr * self.min_lr_ratio
        return floor + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (self.lr - floor)


@dataclass
class TrainResult:
    """Loss estimates every ``eval_every`` steps and at the end; wall time over all sittings."""

    settings: TrainSettings
    history: list[dict] = field(default_factory=list)  # {"step", "train", "val"}
    seconds: float = 0.0
    tokens: int = 0
    kept_step: int | None = None  # keep_best: the step whose weights the model ends with

    @property
    def final(self) -> dict:
        return self.history[-1]

    def to_dict(self) -> dict:
        return {"settings": asdict(self.settings), "history": self.history, "seconds": round(self.seconds, 1),
                "tokens": self.tokens, "kept_step": self.kept_step}


def cross_entropy(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Mean next-token cross-entropy of ``model`` on inputs ``x`` and targets ``y``."""
    logits = logits_of(model, x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


@torch.no_grad()
def estimate_loss(model: nn.Module, batch: Batch, settings: TrainSettings) -> dict[str, float]:
    """Mean loss over the same ``eval_batches`` batches of each split every time (seeded)."""
    was_training = model.training
    model.eval()
    losses = {}
    for split in ("train", "val"):
        rng = torch.Generator().manual_seed(settings.seed + 10**9)
        losses[split] = sum(cross_entropy(model, *batch(split, rng)).item()
                            for _ in range(settings.eval_batches)) / settings.eval_batches
    model.train(was_training)
    return losses


def train(model: nn.Module, batch: Batch, settings: TrainSettings, state_dir: Path | None = None,
          progress: bool = True, loss_fn: Callable[[nn.Module, Tensor, Tensor], Tensor] = cross_entropy,
          checkpoint_seconds: float = 60.0) -> TrainResult:
    """Train ``model``'s trainable parameters; resume from ``state_dir`` when it holds a checkpoint.

    The loss is estimated at step 0, every ``eval_every`` steps and at the end; the checkpoint is
    rewritten at most every ``checkpoint_seconds`` (so an interruption loses at most that much).
    With ``settings.keep_best`` the model ends with the weights of the estimate with the lowest
    validation loss (as Step 2 keeps its best epoch), which guards short fine-tunes (QAT) against
    ending worse than some point they passed through.
    """
    _as_normal_tensors(model)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    optimizer = _adamw(params, settings)
    result = TrainResult(settings)
    best: dict[str, Tensor] = {}
    start_step = _resume(state_dir, model, optimizer, params, result, best) if state_dir else 0
    model.train()
    started, last_save = time.perf_counter(), time.perf_counter()
    bar = tqdm(range(start_step, settings.steps), initial=start_step, total=settings.steps, unit="step",
               disable=not progress, dynamic_ncols=True, desc="train")
    tokens_done = 0
    for step in bar:
        if step % settings.eval_every == 0 and not _logged(result, step):
            _estimate(model, batch, settings, step, result, params, best)
        for group in optimizer.param_groups:
            group["lr"] = settings.lr_at(step)
        torch.manual_seed(settings.seed + step)  # dropout of this step
        x, y = batch("train", torch.Generator().manual_seed(settings.seed + step))
        loss = loss_fn(model, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if settings.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params.values(), settings.grad_clip)
        optimizer.step()
        tokens_done += y.numel()
        elapsed = time.perf_counter() - started
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens_done / max(elapsed, 1e-9):.0f}",
                        refresh=False)
        if state_dir and time.perf_counter() - last_save >= checkpoint_seconds:
            _save_state(state_dir, step + 1, params, optimizer, result, elapsed, tokens_done, best)
            last_save = time.perf_counter()
    if not _logged(result, settings.steps):
        _estimate(model, batch, settings, settings.steps, result, params, best)
    result.seconds += time.perf_counter() - started
    result.tokens += tokens_done
    if state_dir:
        _save_state(state_dir, settings.steps, params, optimizer, result, 0.0, 0, best)
    if settings.keep_best and best:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(best[name])
        result.kept_step = min(result.history, key=lambda h: h["val"])["step"]
    model.eval()
    return result


def _estimate(model: nn.Module, batch: Batch, settings: TrainSettings, step: int, result: TrainResult,
              params: dict[str, nn.Parameter], best: dict[str, Tensor]) -> None:
    """Log the loss at ``step``; with ``keep_best``, copy the weights when validation is the lowest yet."""
    losses = estimate_loss(model, batch, settings)
    if settings.keep_best and all(losses["val"] < h["val"] for h in result.history):
        best.update({name: p.detach().clone() for name, p in params.items()})
    result.history.append({"step": step, **losses})


def _as_normal_tensors(model: nn.Module) -> None:
    """Tensors made under ``torch.inference_mode`` (e.g. by an earlier ``generate``) cannot enter
    autograd; give any such parameter or buffer an ordinary copy before training."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_inference():
                t.data = t.data.clone()


def _logged(result: TrainResult, step: int) -> bool:
    """Whether the loss at ``step`` is already in the history (a resumed run re-enters there)."""
    return bool(result.history) and result.history[-1]["step"] >= step


def _adamw(params: dict[str, nn.Parameter], settings: TrainSettings) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (nanoGPT: not on biases and norm gains)."""
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, settings.beta2))


def _save_state(state_dir: Path, step: int, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
                result: TrainResult, seconds: float, tokens: int, best: dict[str, Tensor]) -> None:
    """Weights + Adam moments (safetensors) and step/history (JSON), each written then renamed.

    The JSON names the step the weights belong to and is renamed last, so a reader never pairs
    new weights with an old step; ``seconds``/``tokens`` are this sitting's so far.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"param.{name}": p.detach().contiguous() for name, p in params.items()}
    tensors.update({f"best.{name}": t.contiguous() for name, t in best.items()})
    by_id = {id(p): name for name, p in params.items()}
    for p, st in optimizer.state.items():
        for key in ("exp_avg", "exp_avg_sq"):
            tensors[f"adam.{by_id[id(p)]}.{key}"] = st[key].contiguous()
    meta = {"step": step, "settings": asdict(result.settings), "history": result.history,
            "seconds": result.seconds + seconds, "tokens": result.tokens + tokens}
    tmp = state_dir / f".{STATE_WEIGHTS}.tmp"
    save_file(tensors, str(tmp), metadata={"step": str(step)})
    os.replace(tmp, state_dir / STATE_WEIGHTS)
    tmp = state_dir / f".{STATE_JSON}.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, state_dir / STATE_JSON)


def _resume(state_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
            params: dict[str, nn.Parameter], result: TrainResult, best: dict[str, Tensor]) -> int:
    """Load the checkpoint in ``state_dir`` if there is one; the step to continue from."""
    if not (state_dir / STATE_JSON).is_file():
        return 0
    try:
        meta = json.loads((state_dir / STATE_JSON).read_text())
        tensors = load_file(str(state_dir / STATE_WEIGHTS))
    except (OSError, ValueError, SafetensorError) as exc:
        raise PotqError(f"the checkpoint in {state_dir} is corrupt ({exc}); delete the folder to start over") from None
    if meta.get("settings") != asdict(result.settings):
        raise PotqError(f"the checkpoint in {state_dir} was made with other settings; "
                        "pass the same settings to resume, or delete the folder to start over")
    step = int(meta["step"])
    with torch.no_grad():
        for name, p in params.items():
            if f"param.{name}" not in tensors:
                raise PotqError(f"the checkpoint in {state_dir} lacks {name}; delete the folder to start over")
            p.copy_(tensors[f"param.{name}"])
    for name, p in params.items():
        if f"adam.{name}.exp_avg" in tensors:
            optimizer.state[p] = {"step": torch.tensor(float(step)),
                                  "exp_avg": tensors[f"adam.{name}.exp_avg"],
                                  "exp_avg_sq": tensors[f"adam.{name}.exp_avg_sq"]}
    best.update({name: tensors[f"best.{name}"] for name in params if f"best.{name}" in tensors})
    result.history, result.seconds, result.tokens = meta["history"], meta["seconds"], meta["tokens"]
    model.train()
    return step
