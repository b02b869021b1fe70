"""A lean batch-1 decoder for LLaMA-family models: transformers' computation, less overhead.

Decoding one token of a small model on a CPU is dominated not by arithmetic but by the per-token
cost of the framework: transformers' LLaMA forward builds masks, position embeddings and cache
objects and runs about fifty small tensor ops per block. :class:`LlamaDecoder` runs the same
blocks — the model's own linear layers (float ``nn.Linear`` or potq's packed ``QuantLinear``),
norm weights and rotary tables — with a preallocated KV cache and about twenty ops per block,
and computes the output head only for the last position. It is what ``potq generate`` and the
decoding benchmark use for LLaMA models (the same path for the float and the quantized model);
everything else goes through transformers' forward with its ``DynamicCache``. Its logits equal
transformers' to float rounding (tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def supports(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers LLaMA causal LM this decoder reproduces."""
    config = getattr(model, "config", None)
    return (getattr(config, "model_type", None) == "llama" and hasattr(model, "model")
            and hasattr(model.model, "rotary_emb") and hasattr(model, "lm_head"))


class LlamaDecoder:
    """Feed tokens, get the next-token logits; keeps its own KV cache of ``max_len`` positions."""

    def __init__(self, model: nn.Module, max_len: int) -> None:
        config, inner = model.config, model.model
        self.model, self.max_len, self.length = model, max_len, 0
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.eps, self.hidden = config.rms_norm_eps, config.hidden_size
        device = inner.norm.weight.device
        dtype = inner.norm.weight.dtype
        with torch.no_grad():
            cos, sin = inner.rotary_emb(torch.zeros(1, device=device, dtype=dtype),
                                        torch.arange(max_len, device=device)[None])
        self.cos, self.sin = cos[:, None], sin[:, None]  # [1, 1, max_len, head_dim]
        shape = (len(inner.layers), 1, self.kv_heads, max_len, self.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)

    def __call__(self, ids: Tensor) -> Tensor:
        """Logits ``[vocab]`` after the tokens ``ids`` (``[1, T]``) following those fed before."""
        if self.length + ids.shape[1] > self.max_len:
            raise ValueError(f"the decoder holds {self.max_len} positions")
        if self.length > 0 and ids.shape[1] > 1:  # causal masking below assumes a prompt starts at 0
            for t in range(ids.shape[1]):
                logits = self(ids[:, t:t + 1])
            return logits
        inner, T, start = self.model.model, ids.shape[1], self.length
        end = start + T
        cos, sin = self.cos[:, :, start:end], self.sin[:, :, start:end]
        h = inner.embed_tokens(ids)
        for i, layer in enumerate(inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            x = F.rms_norm(h, (self.hidden,), layer.input_layernorm.weight, self.eps)
            q = attn.q_proj(x).view(1, T, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(1, T, self.kv_heads, self.head_dim).transpose(1, 2)
            self.keys[i, :, :, start:end] = k * cos + _rotate_half(k) * sin
            self.values[i, :, :, start:end] = attn.v_proj(x).view(1, T, self.kv_heads, self.head_dim).transpose(1, 2)
            o = F.scaled_dot_product_attention(q * cos + _rotate_half(q) * sin, self.keys[i, :, :, :end],
                                               self.values[i, :, :, :end], is_causal=T > 1, scale=attn.scaling,
                                               enable_gqa=self.heads != self.kv_heads)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(1, T, self.heads * self.head_dim))
            x = F.rms_norm(h, (self.hidden,), layer.post_attention_layernorm.weight, self.eps)
            h = h + mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
        self.length = end
        last = F.rms_norm(h[:, -1:], (self.hidden,), inner.norm.weight, self.eps)
        return self.model.lm_head(last)[0, -1]


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
