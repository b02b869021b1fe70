"""karpathy/llama2.c checkpoints: the legacy ``.bin`` export (version 0) and its ``tok*.bin`` vocabulary.

File layout (``run.c``): seven int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
seq_len; a negative vocab_size means the classifier is not shared with the embedding), then float32
arrays, each stacked over layers: token embedding, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3,
rms_final, the legacy RoPE tables freq_cis_real/imag, and the classifier when not shared.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, PreTrainedModel

from potq.errors import PotqError
from potq.limits import MAX_TOKENIZER_BYTES, check_config, read_small_file
from potq.models import llama
from potq.models.tokenizer import Tokenizer

HEADER = struct.Struct("<7i")
VERSIONED_MAGIC = 0x616B3432  # "ak42": llama2.c's newer export versions, a different layout
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2  # fixed in run.c / llama's sentencepiece model
# llama2.c's exporter wrote BOS/EOS as "\n<s>\n" / "\n</s>\n"; the vocabulary spells them plainly.
SPECIAL_PIECES = {BOS_ID: "<s>", EOS_ID: "</s>"}
# Per-block arrays in file order, and the transformers weight each one is (w1 gate, w2 down, w3 up).
BLOCK_ARRAYS = {
    "rms_att": llama.ATTN_NORM, "wq": llama.ATTN_Q, "wk": llama.ATTN_K, "wv": llama.ATTN_V, "wo": llama.ATTN_OUT,
    "rms_ffn": llama.FFN_NORM, "w1": llama.FFN_GATE, "w2": llama.FFN_DOWN, "w3": llama.FFN_UP,
}


def load(path: Path) -> tuple[PreTrainedModel, Tokenizer]:
    """The float32 ``LlamaForCausalLM`` of a llama2.c checkpoint, and the vocabulary beside it."""
    config, floats = _read(path)
    weights = _weights(config, floats)
    return llama.build_llama(config, weights, str(path)), _tokenizer(path, config.vocab_size)


def _read(path: Path) -> tuple[LlamaConfig, np.ndarray]:
    """The config from the header and the float32 payload, checked to be exactly the right size."""
    with path.open("rb") as stream:  # the header first: its sizes are checked before the payload is read
        head = stream.read(HEADER.size)
    if len(head) < HEADER.size:
        raise PotqError(f"{path} is too short for a llama2.c checkpoint; re-export it")
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab, seq_len = HEADER.unpack_from(head)
    if dim == VERSIONED_MAGIC:
        raise PotqError(f"{path} is a versioned llama2.c export; re-export it with --version 0 (legacy)")
    if min(dim, hidden_dim, n_layers, n_heads, n_kv_heads, abs(vocab), seq_len) <= 0:
        raise PotqError(f"{path} has a nonsensical llama2.c header; it is not a llama2.c .bin checkpoint")
    config = llama.llama_config(dim=dim, hidden_dim=hidden_dim, n_layers=n_layers, n_heads=n_heads,
                                n_kv_heads=n_kv_heads, vocab_size=abs(vocab), max_seq_len=seq_len,
                                tied=vocab > 0, bos_id=BOS_ID, eos_id=EOS_ID)
    check_config(config.to_dict(), str(path))
    expected = sum(math.prod(shape) for _, shape in _layout(config))
    payload = path.stat().st_size - HEADER.size
    if payload != 4 * expected:
        raise PotqError(f"{path} holds {payload} bytes of weights, the header implies {4 * expected}; "
                        "the file is truncated or not a llama2.c checkpoint")
    return config, np.frombuffer(path.read_bytes(), np.float32, offset=HEADER.size)


def _layout(config: LlamaConfig) -> list[tuple[str, tuple[int, ...]]]:
    """``(array name, shape)`` in file order; shapes are torch ``Linear`` order (out, in)."""
    dim, hidden, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv_dim = config.num_key_value_heads * config.head_dim
    shapes = {"rms_att": (dim,), "wq": (dim, dim), "wk": (kv_dim, dim), "wv": (kv_dim, dim), "wo": (dim, dim),
              "rms_ffn": (dim,), "w1": (hidden, dim), "w2": (dim, hidden), "w3": (hidden, dim)}
    rope_table = (config.max_position_embeddings * config.head_dim // 2,)
    layout = [("token_embedding", (config.vocab_size, dim))]
    layout += [(name, (layers, *shapes[name])) for name in BLOCK_ARRAYS]
    layout += [("rms_final", (dim,)), ("freq_cis_real", rope_table), ("freq_cis_imag", rope_table)]
    if not config.tie_word_embeddings:
        layout.append(("wcls", (config.vocab_size, dim)))
    return layout


def _weights(config: LlamaConfig, floats: np.ndarray) -> dict[str, torch.Tensor]:
    """The payload cut into arrays, under transformers' names (the RoPE tables are not weights)."""
    arrays, offset = {}, 0
    for name, shape in _layout(config):
        size = math.prod(shape)
        arrays[name] = torch.from_numpy(floats[offset:offset + size].copy()).reshape(shape)
        offset += size
    weights = {llama.EMBEDDING: arrays["token_embedding"], llama.FINAL_NORM: arrays["rms_final"]}
    if "wcls" in arrays:
        weights[llama.CLASSIFIER] = arrays["wcls"]
    for name, hf_name in BLOCK_ARRAYS.items():
        for layer, tensor in enumerate(arrays[name]):
            weights[f"model.layers.{layer}.{hf_name}"] = tensor
    return weights


def _tokenizer(model_path: Path, vocab_size: int) -> Tokenizer:
    """The ``tok{vocab}.bin`` (else ``tokenizer.bin``) beside the checkpoint, as a sentencepiece BPE."""
    candidates = [model_path.with_name(f"tok{vocab_size}.bin"), model_path.with_name("tokenizer.bin")]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise PotqError(f"no llama2.c tokenizer beside {model_path}; put tok{vocab_size}.bin or tokenizer.bin there")
    tokens, scores = _read_vocab(path, vocab_size)
    vocab = {"tokenizer_type": "llama", "tokens": tokens, "scores": scores,
             "token_type": [_token_type(i, token) for i, token in enumerate(tokens)]}
    return llama.vocab_tokenizer(vocab, "llama", BOS_ID, EOS_ID, add_bos=True, source=str(path))


def _read_vocab(path: Path, vocab_size: int) -> tuple[list[str], list[float]]:
    """Tokens and scores of a ``tok*.bin`` file, respelled as sentencepiece pieces.

    The exporter wrote the sentencepiece space ``▁`` as a plain space and decorated BOS/EOS; both
    are undone so the vocabulary equals the one llama.cpp put into the GGUF.
    """
    raw = read_small_file(path, "the llama2.c tokenizer", MAX_TOKENIZER_BYTES)
    tokens, scores, offset = [], [], 4
    try:
        for index in range(vocab_size):
            score, length = struct.unpack_from("<fi", raw, offset)
            piece = raw[offset + 8:offset + 8 + length].decode("utf-8")
            offset += 8 + length
            tokens.append(SPECIAL_PIECES.get(index, piece.replace(" ", "\u2581")))
            scores.append(score)
    except (struct.error, UnicodeDecodeError):
        raise PotqError(f"{path} is not a llama2.c tokenizer with {vocab_size} tokens; use the model's own") from None
    if offset != len(raw):
        raise PotqError(f"{path} does not hold exactly {vocab_size} tokens; use the model's own tokenizer file")
    return tokens, scores


def _token_type(index: int, token: str) -> int:
    """GGUF token type: 2 unknown, 3 control (BOS/EOS), 6 byte fallback ``<0xXX>``, 1 normal."""
    if index == UNK_ID:
        return 2
    if index in (BOS_ID, EOS_ID):
        return 3
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        return 6
    return 1
