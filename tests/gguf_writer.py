"""Tiny GGUF files of several architectures, written with the gguf package's own writer and
tensor-name map (as llama.cpp's converter names them), from the tiny models of tests/zoo.py."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from potq.paths import shared_file
from tests.zoo import tiny_model

ARCHS = {"qwen2": "qwen2", "qwen3": "qwen3", "mistral": "llama", "phi3": "phi3"}  # zoo kind -> GGUF architecture


def write_gguf(kind: str, path: Path, tensor_type: str = "F32", model=None):  # noqa: ANN001, ANN201
    """``path`` holding the tiny ``kind`` model (or ``model``; its weights as ``tensor_type``), with
    stories260K's 512-token vocabulary; returns the model it was written from."""
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
    writer.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    if getattr(c, "head_dim", None):
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
    source = gguf.GGUFReader(shared_file("models/stories260K/stories260K.gguf"))
    writer.add_tokenizer_model(source.fields["tokenizer.ggml.model"].contents())
    writer.add_token_list(source.fields["tokenizer.ggml.tokens"].contents())
    writer.add_token_scores(source.fields["tokenizer.ggml.scores"].contents())
    writer.add_token_types(source.fields["tokenizer.ggml.token_type"].contents())
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, c.num_hidden_layers)
    kind_of = gguf.GGMLQuantizationType[tensor_type]
    for name, tensor in model.state_dict().items():
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        values = tensor.float().numpy()
        if arch == "llama" and any(f"self_attn.{p}_proj.weight" in name for p in "qk"):  # llama.cpp's q/k order
            heads = c.num_attention_heads if "q_proj" in name else c.num_key_value_heads
            values = values.reshape(heads, 2, values.shape[0] // heads // 2, *values.shape[1:]).swapaxes(1, 2)
            values = values.reshape(tensor.shape)
        if kind_of == gguf.GGMLQuantizationType.F32 or values.ndim == 1:
            writer.add_tensor(new, values.astype(np.float32))
        else:
            writer.add_tensor(new, gguf.quants.quantize(values, kind_of), raw_dtype=kind_of)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model
