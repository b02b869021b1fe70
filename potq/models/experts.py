"""Mixture-of-experts layers as plain linears, so every method quantizes every expert.

transformers 5 keeps the experts of Mixtral and Qwen3-MoE as two fused 3-D parameters in one
module (``gate_up_proj`` ``[E, 2I, d]``, ``down_proj`` ``[E, d, I]``) whose forward loops over
the experts the router picked. potq swaps that module for :class:`ExpertLinears`: the same
loop over one ``nn.Linear`` pair per expert. Every method then treats an expert like any other
linear — GPTQ's Hessian and AWQ's statistics come from the tokens routed to that expert — and
the packed model holds a packed layer per expert. The router is a bare weight, not a linear: it
stays float, as it should (a wrong route costs more than a rounded weight).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' fused experts layout (gate/up fused, ``[E, out, in]``)."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(gate_up, Tensor) and isinstance(down, Tensor) and gate_up.dim() == 3 and down.dim() == 3
            and gate_up.shape[2] == down.shape[1] and gate_up.shape[1] == 2 * down.shape[2])


class Expert(nn.Module):
    """One expert's two projections: ``gate_up_proj`` (gate rows, then up rows) and ``down_proj``."""

    def __init__(self, hidden: int, intermediate: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False, device=device, dtype=dtype)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False, device=device, dtype=dtype)


class ExpertLinears(nn.Module):
    """transformers' fused experts computed the same way, with a linear per expert projection."""

    def __init__(self, fused: nn.Module) -> None:
        super().__init__()
        experts, two_i, hidden = fused.gate_up_proj.shape
        weight = fused.gate_up_proj
        self.num_experts, self.act_fn = experts, fused.act_fn
        self.experts = nn.ModuleList(Expert(hidden, two_i // 2, weight.device, weight.dtype) for _ in range(experts))
        if not weight.is_meta:
            with torch.no_grad():
                for e, expert in enumerate(self.experts):
                    expert.gate_up_proj.weight.copy_(fused.gate_up_proj[e])
                    expert.down_proj.weight.copy_(fused.down_proj[e])

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            # one class more, as transformers does: an index of num_experts is a dropped slot
            routed = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = routed[:self.num_experts].sum(dim=(-1, -2)).nonzero()[:, 0].tolist()
        for e in hit:
            slot, token = torch.where(routed[e])
            gate, up = self.experts[e].gate_up_proj(hidden_states[token]).chunk(2, dim=-1)
            y = self.experts[e].down_proj(self.act_fn(gate) * up) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def unfuse_experts(model: nn.Module) -> nn.Module:
    """Replace every fused experts module of ``model`` by :class:`ExpertLinears`, in place."""
    for name, module in list(model.named_modules()):
        if is_fused_experts(module):
            model.set_submodule(name, ExpertLinears(module))
    return model
