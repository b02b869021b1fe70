"""Tiny random-init models of every decoder class potq supports, built with transformers' own
classes (hidden size 64, 2 layers, grouped-query attention where the config has it), saved as
Hugging Face folders with a tokenizer — what "a model a user brings" looks like, in miniature."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as T

VOCAB = 512
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
CONFIGS = {
    "llama": lambda: T.LlamaConfig(**COMMON),
    "mistral": lambda: T.MistralConfig(**COMMON, sliding_window=None),
    "qwen2": lambda: T.Qwen2Config(**COMMON),
    "qwen3": lambda: T.Qwen3Config(**COMMON, head_dim=16),
    "gemma2": lambda: T.Gemma2Config(**COMMON, head_dim=16, query_pre_attn_scalar=16, sliding_window=128),
    "gemma3_text": lambda: T.Gemma3TextConfig(**COMMON, head_dim=16, query_pre_attn_scalar=16, sliding_window=128),
    "phi3": lambda: T.Phi3Config(**COMMON, pad_token_id=0),
    "gpt2": lambda: T.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                 bos_token_id=1, eos_token_id=2),
    "opt": lambda: T.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64,
                               bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "gpt_neox": lambda: T.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
                                        bos_token_id=1, eos_token_id=2),
    "mixtral": lambda: T.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": lambda: T.Qwen3MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                          head_dim=16),
}


def tiny_model(kind: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random-init ``kind`` model; ``overrides`` change its config (given to the config class,
    which derives what depends on them, e.g. Gemma 3's rotary bases per layer type)."""
    config = CONFIGS[kind]()
    if overrides:
        config = type(config)(**{**config.to_dict(), **overrides})
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(config).eval()


def tiny_folder(kind: str, folder: Path, tokenizer) -> Path:  # noqa: ANN001
    """A Hugging Face folder of a tiny ``kind`` model with ``tokenizer`` (a potq Tokenizer of 512 tokens)."""
    tiny_model(kind).save_pretrained(folder)
    tokenizer.backend.save(str(folder / "tokenizer.json"))
    return folder
