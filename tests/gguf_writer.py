"""Tiny GGUF files of several architectures, written with the gguf package's own writer and
tensor-name map (as llama.cpp's converter names them), from the tiny models of tests/zoo.py."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from potq.paths import shared_file
from tests.zoo import VOCAB, tiny_model

ARCHS = {"qwen2": "qwen2", "qwen3": "qwen3", "mistral": "llama", "phi3": "phi3", "gemma2": "gemma2",
         "gemma3_text": "gemma3", "qwen3_moe": "qwen3moe"}  # zoo kind -> GGUF architecture


def write_gguf(kind: str, path: Path, tensor_type: str = "F32", model=None,  # noqa: ANN001, ANN201
               chat_template: str | None = None):
    """``path`` holding the tiny ``kind`` model (or ``model``; its weights as ``tensor_type``), with
    stories260K's 512-token vocabulary (and ``chat_template``); returns the model it was written from."""
    model, arch = model if model is not None else tiny_model(kind), ARCHS[kind]
    c = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)  # Gemma-3: one per attention kind
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if getattr(c, "sliding_window", None):
        writer.add_sliding_window(c.sliding_window)
    if getattr(c, "num_experts", None):
        writer.add_expert_count(c.num_experts)
        writer.add_expert_used_count(c.num_experts_per_tok)
        writer.add_expert_feed_forward_length(c.moe_intermediate_size)
    if getattr(c, "head_dim", None):
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
    source = gguf.GGUFReader(shared_file("models/stories260K/stories260K.gguf"))
    writer.add_tokenizer_model(source.fields["tokenizer.ggml.model"].contents())
    writer.add_token_list(source.fields["tokenizer.ggml.tokens"].contents())
    writer.add_token_scores(source.fields["tokenizer.ggml.scores"].contents())
    writer.add_token_types(source.fields["tokenizer.ggml.token_type"].contents())
    if c.vocab_size != VOCAB:  # Gemma's tokenizer gains special tokens: rows for them
        writer.add_vocab_size(c.vocab_size)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, c.num_hidden_layers)
    kind_of = gguf.GGMLQuantizationType[tensor_type]
    for name, tensor in model.state_dict().items():
        values = tensor.float().numpy()
        if name.endswith("experts.gate_up_proj"):  # llama.cpp stacks each projection of all experts apart
            block = name.split(".")[2]
            gate, up = np.split(values, 2, axis=1)
            writer.add_tensor(f"blk.{block}.ffn_gate_exps.weight", gate.copy())
            writer.add_tensor(f"blk.{block}.ffn_up_exps.weight", up.copy())
            continue
        if name.endswith("experts.down_proj"):
            writer.add_tensor(f"blk.{name.split('.')[2]}.ffn_down_exps.weight", values.copy())
            continue
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if name == "lm_head.weight" and c.tie_word_embeddings:  # llama.cpp writes it once
            continue
        if arch.startswith("gemma") and name.endswith("norm.weight"):  # llama.cpp stores Gemma's 1 + w
            values = values + 1
        if arch == "llama" and any(f"self_attn.{p}_proj.weight" in name for p in "qk"):  # llama.cpp's q/k order
            heads = c.num_attention_heads if "q_proj" in name else c.num_key_value_heads
            values = values.reshape(heads, 2, values.shape[0] // heads // 2, *values.shape[1:]).swapaxes(1, 2)
            values = values.reshape(tensor.shape)
        if kind_of == gguf.GGMLQuantizationType.F32 or values.ndim == 1:
            writer.add_tensor(new, values.astype(np.float32))
        elif kind_of == gguf.GGMLQuantizationType.IQ4_NL:  # the gguf package cannot quantize to i-quants
            writer.add_tensor(new, iq4_nl_blocks(values.shape), raw_dtype=kind_of)
        else:
            writer.add_tensor(new, gguf.quants.quantize(values, kind_of), raw_dtype=kind_of)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


def iq4_nl_blocks(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Random IQ4_NL blocks of a ``shape`` matrix (per 32 weights: an fp16 scale, 16 bytes of
    4-bit indices into llama.cpp's non-linear table): the weights they decode to are what a
    reader must produce."""
    rows, cols = shape
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows, cols // 32, 18), dtype=np.uint8)
    scales = (rng.uniform(0.5, 2.0, size=(rows, cols // 32)) * 0.02 / 127).astype(np.float16)
    blocks[..., :2] = scales.view(np.uint8).reshape(rows, cols // 32, 2)
    return blocks.reshape(rows, cols // 32 * 18)
