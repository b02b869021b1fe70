"""karpathy/llm.c GPT-2 checkpoints (``gpt2_124M.bin``, ``gpt2_124M_bf16.bin``).

Layout (``train_gpt2.c``): 256 int32 of header — magic 20240326, version (3: float32, 5: bfloat16),
max_seq_len, vocab_size, num_layers, num_heads, channels, padded_vocab_size — then the 16
parameter tensors in this order, each stacked over layers, weights ``[out, in]``:
wte (Vp, C), wpe (maxT, C), ln1w, ln1b, qkvw (3C, C), qkvb, attprojw (C, C), attprojb, ln2w, ln2b,
fcw (4C, C), fcb, fcprojw (C, 4C), fcprojb, lnfw, lnfb. The token table is padded to Vp rows;
the padding rows are never used and are dropped. The tokenizer is GPT-2's BPE from the shared folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import GPT2Config, PreTrainedModel

from potq.errors import PotqError
from potq.limits import check_config
from potq.models.gpt2_bpe import END_OF_TEXT_ID, gpt2_tokenizer
from potq.models.hf import empty_model
from potq.models.tokenizer import Tokenizer

MAGIC = 20240326
HEADER_INTS = 256
DTYPES = {3: (np.float32, 4), 5: (np.uint16, 2)}  # version -> (array type, bytes); bf16 read as raw uint16
# (name in the file, transformers name per layer or None for the model-level tensors, shape)
_BLOCK = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
          "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
          "mlp.c_proj.weight", "mlp.c_proj.bias")


def is_llmc(path: Path) -> bool:
    """Whether ``path`` starts with llm.c's model magic (llama2.c ``.bin`` files do not)."""
    with path.open("rb") as f:
        head = f.read(4)
    return len(head) == 4 and int.from_bytes(head, "little") == MAGIC


def load(path: Path) -> tuple[PreTrainedModel, Tokenizer]:
    """The float32 ``GPT2LMHeadModel`` of an llm.c checkpoint, with GPT-2's tokenizer."""
    with path.open("rb") as stream:  # the header first: its sizes are checked before the payload is read
        head = stream.read(4 * HEADER_INTS)
    if len(head) < 4 * HEADER_INTS:
        raise PotqError(f"{path} is shorter than an llm.c header; the file is truncated")
    header = np.frombuffer(head, dtype="<i4")
    version, max_t, vocab, layers, heads, c, padded = (int(v) for v in header[1:8])
    if version not in DTYPES:
        raise PotqError(f"{path} is an llm.c checkpoint of version {version}; potq reads versions 3 (fp32) "
                        "and 5 (bf16): re-export it with llm.c's current train_gpt2.py")
    if min(max_t, vocab, layers, heads, c) <= 0 or padded < vocab or c % heads:
        raise PotqError(f"{path}: inconsistent llm.c header (vocab {vocab}, padded {padded}, C {c}, "
                        f"{heads} heads); the file is corrupt")
    dtype, size = DTYPES[version]
    shapes = _shapes(max_t, padded, layers, c)
    count = sum(int(np.prod(s)) for s in shapes)
    check_config({"n_positions": max_t, "vocab_size": padded, "n_layer": layers, "n_head": heads, "n_embd": c},
                 str(path))
    if path.stat().st_size != 4 * HEADER_INTS + size * count:
        raise PotqError(f"{path} holds {path.stat().st_size - 4 * HEADER_INTS} parameter bytes, the header "
                        f"implies {size * count}; the file is truncated or corrupt")
    raw = path.read_bytes()
    flat = np.frombuffer(raw, dtype=dtype, offset=4 * HEADER_INTS)
    if version == 5:  # bfloat16: the high half of a float32
        flat = (flat.astype(np.uint32) << 16).view(np.float32)
    tensors, start = [], 0
    for shape in shapes:
        n = int(np.prod(shape))
        tensors.append(torch.from_numpy(flat[start:start + n].astype(np.float32).reshape(shape)))
        start += n
    config = GPT2Config(vocab_size=vocab, n_positions=max_t, n_embd=c, n_layer=layers, n_head=heads,
                        activation_function="gelu_new", tie_word_embeddings=True,
                        bos_token_id=END_OF_TEXT_ID, eos_token_id=END_OF_TEXT_ID)
    model = empty_model(config)
    state = {"transformer.wte.weight": tensors[0][:vocab], "transformer.wpe.weight": tensors[1],
             "transformer.ln_f.weight": tensors[14], "transformer.ln_f.bias": tensors[15]}
    for i in range(layers):
        for name, stacked in zip(_BLOCK, tensors[2:14]):
            state[f"transformer.h.{i}.{name}"] = stacked[i]
    with torch.no_grad():
        for key, value in state.items():
            model.get_parameter(key).copy_(value)
    return model, gpt2_tokenizer()


def _shapes(max_t: int, padded: int, layers: int, c: int) -> list[tuple[int, ...]]:
    """The 16 tensors' shapes in file order (see the module docstring)."""
    return [(padded, c), (max_t, c), (layers, c), (layers, c), (layers, 3 * c, c), (layers, 3 * c),
            (layers, c, c), (layers, c), (layers, c), (layers, c), (layers, 4 * c, c), (layers, 4 * c),
            (layers, c, 4 * c), (layers, c), (c,), (c,)]
