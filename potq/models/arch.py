"""One description of a decoder, derived from its modules rather than written per family.

Everything the methods and storage need to know about a transformers causal LM comes from here:

- **which architectures** potq takes (:data:`ARCHITECTURES`, by ``config.model_type``) — each one a
  line, tested on a tiny random model of its class; the fused 3-D experts of MoE classes become a
  linear per expert (:mod:`potq.models.experts`);
- **where the blocks are** (:func:`decoder_blocks`): the module list holding
  ``num_hidden_layers`` blocks, found by looking, whatever the family calls it;
- **what may be folded where** (:func:`fold_groups`): which module's output channels feed which
  linears so that dividing the first by ``s`` and multiplying the others' input columns by ``s``
  leaves the block's function unchanged — AWQ's equivalent transformation. It is found by
  *trying* the fold on the block with a sample input and keeping only folds that change the
  block's output by no more than float rounding, so a norm with a ``(1 + w)`` weight (Gemma),
  a ReLU between two linears (OPT) or a fused gate/up projection (Phi-3) each get the right
  answer without a table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from potq.errors import PotqError

# config.model_type -> the transformers class potq loads it as
ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM", "gpt2": "GPT2LMHeadModel", "opt": "OPTForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM", "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
}


def check_supported(model_type: Any, where: str) -> str:
    """``model_type`` if potq takes it, else one line naming what it does take."""
    if isinstance(model_type, str) and model_type in ARCHITECTURES:
        return model_type
    raise PotqError(f"{where} holds a {model_type!r} model; potq supports {', '.join(ARCHITECTURES.values())}")


def is_moe(config: Any) -> bool:
    """Whether the config's blocks route tokens to experts. Their checkpoints store each expert
    apart while the model fuses them, so such a model is read whole by transformers, not streamed
    tensor by tensor by potq."""
    return bool(getattr(config, "num_local_experts", 0) or getattr(config, "num_experts", 0))


def num_layers(config: Any) -> int:
    return getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer")


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's transformer blocks in order: the outermost module list of
    ``num_hidden_layers`` modules that hold matrices (linears, packed layers, GPT-2's ``Conv1D``)."""
    config = getattr(model, "config", None)
    check_supported(getattr(config, "model_type", None), type(model).__name__)
    count = num_layers(config)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count and any(
                hasattr(m, "in_features") or isinstance(getattr(m, "weight", None), Tensor) and m.weight.dim() == 2
                for m in module[0].modules()):
            return module
    raise PotqError(f"cannot find the {count} decoder blocks of a {type(model).__name__}")


# --- folds ---------------------------------------------------------------------------------------------
@dataclass
class Fold:
    """Divide ``previous``'s output channels by ``s``, multiply the input columns of the linears
    ``names`` (relative to the block) by ``s``: the block computes the same function."""

    previous: nn.Module
    names: list[str]
    divide: Callable[[nn.Module, Tensor], None]

    def apply(self, block: nn.Module, s: Tensor) -> None:
        with torch.no_grad():
            self.divide(self.previous, s)
            for name in self.names:
                block.get_submodule(name).weight.mul_(s)


def _divide_output(module: nn.Module, s: Tensor) -> None:
    """A linear's output rows (and bias), or a norm's per-channel weight (and bias), ÷ s."""
    weight = module.weight
    weight.div_(s[:, None] if weight.dim() == 2 else s)
    if getattr(module, "bias", None) is not None:
        module.bias.div_(s)


def _divide_one_plus(module: nn.Module, s: Tensor) -> None:
    """A norm computing ``x̂ · (1 + w)`` (Gemma): ``1 + w`` ÷ s."""
    module.weight.copy_((1 + module.weight) / s - 1)


def _candidates(block: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """Modules whose output channels a fold may rescale: linears and per-channel norms."""
    found = []
    for name, module in block.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear):
            found.append((name, module, module.out_features))
        elif isinstance(weight, Tensor) and weight.dim() == 1 and "norm" in type(module).__name__.lower():
            found.append((name, module, weight.shape[0]))
    return found


def _linear_inputs(block: nn.Module, x: Tensor, kwargs: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
    """The block's output and every linear's input on ``x``."""
    inputs: dict[str, Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda _m, args, n=n: inputs.__setitem__(n, args[0].detach()))
               for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            out = block(x, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return (out[0] if isinstance(out, tuple) else out), inputs


def fold_groups(block: nn.Module, x: Tensor, kwargs: dict[str, Any]) -> list[Fold]:
    """Every fold that leaves ``block``'s output on the sample ``x`` unchanged (see the module
    docstring): for each candidate module, the linears whose input its rescaling rescales exactly,
    kept when folding into all of them together preserves the block's output."""
    reference, before = _linear_inputs(block, x, kwargs)
    state = {k: v.clone() for k, v in block.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    folds = []
    for name, module, width in _candidates(block):
        s = torch.exp(0.3 * torch.randn(width, generator=generator)).to(x.dtype)
        for divide in (_divide_output, _divide_one_plus) if not isinstance(module, nn.Linear) else (_divide_output,):
            with torch.no_grad():
                divide(module, s)
            _, after = _linear_inputs(block, x, kwargs)
            block.load_state_dict(state)
            names = [n for n, t in after.items() if n != name and t.shape[-1] == width
                     and n in before and t.shape == before[n].shape  # an expert may see other tokens
                     and torch.allclose(t * s, before[n], rtol=1e-4, atol=1e-5 * before[n].abs().max().item())]
            if not names:
                continue
            fold = Fold(module, names, divide)
            fold.apply(block, s)
            output, _ = _linear_inputs(block, x, kwargs)
            block.load_state_dict(state)
            if torch.allclose(output, reference, rtol=1e-3, atol=1e-4 * reference.abs().max().item()):
                folds.append(fold)
                break
    return folds
