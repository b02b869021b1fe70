"""What the GGUF and llama2.c loaders share: a LLaMA config, the RoPE row order, the model build
and the vocabulary-to-tokenizer step.

Both formats store Meta's original LLaMA layout: RoPE rotates *adjacent* pairs (x0, x1), (x2, x3)
... of each query/key head (the complex-number form). transformers' ``LlamaForCausalLM`` rotates
the two *halves* of a head instead (``rotate_half``), and its checkpoint converter reorders the
q/k rows so the two forms give the same attention. Loading either format therefore needs that
same reordering, :func:`interleaved_to_half_split`; everything else is copied as is.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

from potq.errors import PotqError, first_line
from potq.models.hf import empty_model
from potq.models.tokenizer import Tokenizer

# Per-block weights in transformers' names; each loader maps its own names onto these.
ATTN_NORM, ATTN_Q, ATTN_K, ATTN_V, ATTN_OUT = (
    "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
    "self_attn.v_proj.weight", "self_attn.o_proj.weight",
)
FFN_NORM, FFN_GATE, FFN_UP, FFN_DOWN = (
    "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
)
EMBEDDING, FINAL_NORM, CLASSIFIER = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


def llama_config(*, dim: int, hidden_dim: int, n_layers: int, n_heads: int, n_kv_heads: int,
                 vocab_size: int, max_seq_len: int, tied: bool, rope_theta: float = 10000.0,
                 rms_eps: float = 1e-5, bos_id: int | None = 1, eos_id: int | None = 2) -> LlamaConfig:
    """A transformers config from the hyper-parameters both formats store under their own names."""
    if n_heads <= 0 or n_kv_heads <= 0 or dim % n_heads or n_heads % n_kv_heads or (dim // n_heads) % 2:
        raise PotqError(f"inconsistent attention shape (dim {dim}, {n_heads} heads, {n_kv_heads} kv heads); "
                        "the model file is corrupt")
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=dim, intermediate_size=hidden_dim, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, head_dim=dim // n_heads,
        max_position_embeddings=max_seq_len, rms_norm_eps=rms_eps, tie_word_embeddings=tied,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        bos_token_id=_valid_id(bos_id, vocab_size), eos_token_id=_valid_id(eos_id, vocab_size),
        architectures=["LlamaForCausalLM"],
    )


def interleaved_to_half_split(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from adjacent-pair RoPE (Meta, llama.cpp, llama2.c) to rotate_half.

    Inverse of llama.cpp's ``permute`` (HF -> GGUF): within each head, output row ``2i + j`` of the
    file becomes row ``j * head_dim/2 + i``.
    """
    pairs = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, pairs, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def check_shapes(config: LlamaConfig, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """The tensors a file holds (transformers names) are exactly those of ``config``'s model, shape
    for shape — checked on a meta-device skeleton, with the limits on the config and the memory
    the float model needs, before any tensor is allocated or dequantized."""
    from potq.limits import check_config, check_memory, check_tensors, float_bytes

    check_config(config.to_dict(), source)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in empty_model(config).state_dict().items()}
    if config.tie_word_embeddings:
        del expected[CLASSIFIER]
    try:
        check_tensors(expected, shapes, source)
    except PotqError as exc:
        raise PotqError(f"{exc} (not a plain LLaMA model of the header's shape)") from None
    check_memory(3 * float_bytes(expected), f"loading {source}")


def build_llama(config: LlamaConfig, weights: dict[str, torch.Tensor], source: str) -> LlamaForCausalLM:
    """The eval-mode model with ``weights`` (transformers names, q/k still in the interleaved order).

    Every tensor the model needs must be present with its exact shape (:func:`check_shapes`),
    so a truncated or foreign file fails with one line instead of running with garbage.
    """
    check_shapes(config, {k: tuple(v.shape) for k, v in weights.items()}, source)
    weights = dict(weights)
    for layer in range(config.num_hidden_layers):
        for name, heads in ((ATTN_Q, config.num_attention_heads), (ATTN_K, config.num_key_value_heads)):
            key = f"model.layers.{layer}.{name}"
            weights[key] = interleaved_to_half_split(weights[key], heads)
    if config.tie_word_embeddings:
        weights[CLASSIFIER] = weights[EMBEDDING]
    model = empty_model(config)
    # assign: the tensors are fresh copies already, and copying 0.5 GB again costs a second.
    model.load_state_dict(weights, assign=True)
    model.tie_weights()
    return model


def vocab_tokenizer(vocab: dict, architecture: str, bos_id: int | None, eos_id: int | None,
                    add_bos: bool, source: str) -> Tokenizer:
    """A tokenizer from a GGUF-style vocabulary dict (``tokenizer_type``, ``tokens``, ``scores``,
    ``token_type``, ``merges``...), built by transformers' GGUF converter so both formats get the
    same normalizer, pre-tokenizer and decoder llama.cpp would use."""
    try:
        backend, _ = convert_gguf_tokenizer(architecture, vocab)
    except (ValueError, KeyError, TypeError) as exc:
        raise PotqError(f"{source}: cannot build its tokenizer ({first_line(exc)}); unsupported vocabulary") from None
    size = len(vocab["tokens"])
    return Tokenizer(backend, _valid_id(bos_id, size), _valid_id(eos_id, size), add_bos=add_bos)


def _valid_id(token_id: int | None, vocab_size: int) -> int | None:
    """``token_id`` if it names a token; files write "none" as an out-of-range id (e.g. 2**32-1)."""
    return token_id if token_id is not None and 0 <= token_id < vocab_size else None
