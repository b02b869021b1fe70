"""A lean batch-1 decoder for LLaMA-family models: transformers' computation, less overhead.

Decoding one token of a small model on a CPU is dominated not by arithmetic but by the per-token
cost of the framework: transformers' LLaMA forward builds masks, position embeddings and cache
objects and runs about fifty small tensor ops per block. :class:`LlamaDecoder` runs the same
blocks — the model's own weights (float ``nn.Linear`` or potq's packed ``QuantLinear``), norm
weights and rotary tables — with a preallocated KV cache and about ten calls per block: packed
q/k/v and gate/up each computed as one stacked matrix (:mod:`potq.nn.stacked`), batch-1
projections straight into the fused kernel, and a token's rotary embedding + cache write +
attention, RMSNorm and silu(gate)·up as one extension op each (PyTorch ops where the extension is
not built); the output head only for the last position. It is what ``potq generate`` and the
decoding benchmark use for LLaMA models (the same path for the float and the quantized model);
everything else goes through transformers' forward with its ``DynamicCache``. Its logits equal
transformers' to float rounding (tested).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from potq.kernels import fused
from potq.nn.packed import FUSED_MAX_ROWS, QuantLinear
from potq.nn.stacked import stack_rows


def supports(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers LLaMA causal LM this decoder reproduces."""
    config = getattr(model, "config", None)
    return (getattr(config, "model_type", None) == "llama" and hasattr(model, "model")
            and hasattr(model.model, "rotary_emb") and hasattr(model, "lm_head"))


class LlamaDecoder:
    """Feed tokens, get the next-token logits; keeps its own KV cache of ``max_len`` positions.

    Building it stacks a packed model's q/k/v and gate/up weights in place (the layers become
    views of the stacked matrices: same values, same state dict, no extra memory).
    """

    def __init__(self, model: nn.Module, max_len: int) -> None:
        config, inner = model.config, model.model
        self.model, self.max_len, self.length = model, max_len, 0
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.eps = config.rms_norm_eps
        device, dtype = inner.norm.weight.device, inner.norm.weight.dtype
        with torch.no_grad():
            cos, sin = inner.rotary_emb(torch.zeros(1, device=device, dtype=dtype),
                                        torch.arange(max_len, device=device)[None])
            half = self.head_dim // 2  # rotate_half(x)·sin = halves-swapped(x)·(sin, first half negated)
            signed_sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        self.cos, self.sin = cos[0, :, None], signed_sin[0, :, None]  # [max_len, 1, head_dim]
        kernel = dtype == torch.float32 and device.type == "cpu"  # what the extension's ops take
        self.blocks = [_Block(layer, bind_kernel=kernel) for layer in inner.layers]
        self.norm = fused.rms_norm(kernel)
        ops = fused.decoder_ops(kernel)  # one token's attention, and silu(gate)·up, as one call each
        self.attend_step = None if ops is None else ops.attend_step
        self.silu_mul = None if ops is None or config.hidden_act != "silu" else ops.silu_mul
        shape = (len(inner.layers), self.kv_heads, max_len, self.head_dim)
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
        h = inner.embed_tokens(ids)
        for i, block in enumerate(self.blocks):
            x = self.norm(h, block.attn_norm, self.eps)
            o = self._attention(i, block.qkv(x), start, block.scaling)
            h = h + block.o(o)
            x = self.norm(h, block.mlp_norm, self.eps)
            gate_up = block.gate_up(x)
            if self.silu_mul is not None:
                hidden = self.silu_mul(gate_up)
            else:
                gate, up = gate_up.chunk(2, dim=-1)
                hidden = block.act(gate) * up
            h = h + block.down(hidden)
        self.length = start + T
        last = self.norm(h[:, -1:], inner.norm.weight, self.eps)
        return self.model.lm_head(last)[0, -1]

    def _attention(self, i: int, qkv: Tensor, start: int, scaling: float) -> Tensor:
        """Block ``i``'s attention output ``[1, T, H·D]`` for its ``qkv`` projection ``[1, T, (H + 2KV)·D]``
        of the positions from ``start``; writes their keys and values into the cache. One token
        goes through the extension's ``attend_step`` where it is built, else PyTorch's ops."""
        T, H, KV, D = qkv.shape[1], self.heads, self.kv_heads, self.head_dim
        if T == 1 and self.attend_step is not None:
            o = self.attend_step(qkv.view(H + 2 * KV, D), self.cos[start, 0], self.sin[start, 0], self.keys[i],
                                 self.values[i], start, scaling, H)
            return o.view(1, 1, H * D)
        end, qkv = start + T, qkv.view(T, H + 2 * KV, D)
        qk, cos, sin = qkv[:, :H + KV], self.cos[start:end], self.sin[start:end]  # cos, sin: [T, 1, D]
        qk = qk * cos + qk.unflatten(-1, (2, D // 2)).flip(-2).flatten(-2) * sin
        self.keys[i, :, start:end] = qk[:, H:].transpose(0, 1)
        self.values[i, :, start:end] = qkv[:, H + KV:].transpose(0, 1)
        keys, values = self.keys[i, :, :end], self.values[i, :, :end]
        if T == 1:  # each kv head's G = H / KV query heads as one small batch: no mask, no copies
            scores = torch.bmm(qk[0, :H].view(KV, H // KV, D), keys.transpose(1, 2)).mul_(scaling)
            return torch.bmm(torch.softmax(scores, dim=-1), values).view(1, 1, H * D)
        o = F.scaled_dot_product_attention(qk[:, :H].transpose(0, 1), keys, values, is_causal=True,
                                           scale=scaling, enable_gqa=H != KV)
        return o.transpose(0, 1).reshape(1, T, H * D)

    def step_parts(self) -> dict[str, Callable[[], object]]:
        """One decoding step's calls of each kind, on stand-in inputs at the next position: the
        output head, the blocks' projections, their attention. The speed benchmark times each
        alone to show where a step's time goes. Call between steps with a position to spare (the
        cache slot it writes is the next step's, which overwrites it)."""
        config, like = self.model.config, self.cos
        if self.length >= self.max_len:
            raise ValueError(f"the decoder holds {self.max_len} positions")
        hidden = torch.randn(1, 1, config.hidden_size, dtype=like.dtype, device=like.device)
        attended = torch.randn(1, 1, self.heads * self.head_dim, dtype=like.dtype, device=like.device)
        inner = torch.randn(1, 1, config.intermediate_size, dtype=like.dtype, device=like.device)
        qkvs = [block.qkv(hidden) for block in self.blocks]

        def projections() -> None:
            for block in self.blocks:
                block.qkv(hidden), block.o(attended), block.gate_up(hidden), block.down(inner)

        def attention() -> None:
            for i, (block, qkv) in enumerate(zip(self.blocks, qkvs)):
                self._attention(i, qkv, self.length, block.scaling)

        return {"output head": lambda: self.model.lm_head(hidden), "projections": projections,
                "attention": attention}


class _Block:
    """One decoder layer's weights as :class:`LlamaDecoder` calls them."""

    def __init__(self, layer: nn.Module, bind_kernel: bool) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.attn_norm, self.mlp_norm = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
        self.scaling, self.act = attn.scaling, mlp.act_fn
        self.qkv = _Projection([attn.q_proj, attn.k_proj, attn.v_proj], bind_kernel)
        self.o = _Projection([attn.o_proj], bind_kernel)
        self.gate_up = _Projection([mlp.gate_proj, mlp.up_proj], bind_kernel)
        self.down = _Projection([mlp.down_proj], bind_kernel)


class _Projection:
    """``cat([layer(x) for layer in layers], -1)``: by one stacked layer where the layers allow
    (:func:`potq.nn.stacked.stack_rows`), and for a few rows of a float32 input to a layer the
    fused kernel serves, straight into the kernel — a decoding step makes about a hundred of
    these calls, so the per-call Python of a module call is worth skipping."""

    def __init__(self, layers: list[nn.Module], bind_kernel: bool) -> None:
        stacked = layers[0] if len(layers) == 1 else stack_rows(layers)
        self.layers = layers if stacked is None else [stacked]
        self.gemv = fused.bound_gemv(stacked) if bind_kernel and isinstance(stacked, QuantLinear) else None

    def __call__(self, x: Tensor) -> Tensor:
        if self.gemv is not None and x.shape[1] <= FUSED_MAX_ROWS:
            return self.gemv(x.view(x.shape[1], -1)).unsqueeze(0)
        outputs = [layer(x) for layer in self.layers]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
