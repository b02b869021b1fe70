"""The character-level nanoGPT of "PoT weights in LLMs", as a transformers GPT-2.

nanoGPT's model *is* GPT-2 (pre-norm blocks, learned positions, GELU MLP, tied head, biases), so
potq builds it as a ``GPT2LMHeadModel``: every other part of potq (quantization, the block-wise
engine, storage, PT2E export, evaluation) then takes the trained char model exactly like any GPT-2
checkpoint, with no model class of its own. Only two things are nanoGPT's: the seed's shape
(:class:`CharGPTShape`, its "Model Parameters" table) and the character vocabulary (65 symbols
for tiny Shakespeare, ids in sorted-character order as nanoGPT's ``prepare.py`` assigns them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models
from transformers import GPT2Config, GPT2LMHeadModel

from potq.errors import PotqError
from potq.models.hf import as_linear_layers
from potq.models.tokenizer import Tokenizer

SHORT_NAME = "nanogpt-shakespeare"


@dataclass(frozen=True)
class CharGPTShape:
    """The seed's nanoGPT: 4 layers, 4 heads, 128-dim embeddings, 64-character context, dropout 0.2."""

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    dropout: float = 0.2

    def to_dict(self) -> dict:
        return asdict(self)


def char_model(vocab_size: int, shape: CharGPTShape = CharGPTShape(), seed: int = 0) -> GPT2LMHeadModel:
    """A freshly initialised char GPT (GPT-2's init, as nanoGPT's) in training mode.

    nanoGPT uses exact GELU and ties the output head to the token embedding; GPT-2's
    ``Conv1D`` layers become ``nn.Linear`` as in every model potq loads.
    """
    if shape.n_embd % shape.n_head:
        raise PotqError(f"n_embd {shape.n_embd} is not a multiple of n_head {shape.n_head}")
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=shape.block_size, n_embd=shape.n_embd, n_layer=shape.n_layer,
        n_head=shape.n_head, resid_pdrop=shape.dropout, embd_pdrop=shape.dropout, attn_pdrop=shape.dropout,
        activation_function="gelu", tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    return as_linear_layers(GPT2LMHeadModel(config)).train()


def char_tokenizer(text: str) -> Tokenizer:
    """One token per character of ``text``'s alphabet, ids in sorted order (nanoGPT's ``stoi``).

    Built as a ``tokenizers`` BPE without merges (so it saves as a plain ``tokenizer.json`` like
    every potq tokenizer) and a decoder that concatenates characters without spaces.
    """
    alphabet = sorted(set(text))
    if not alphabet:
        raise PotqError("the training text is empty: give a non-empty text file")
    backend = BackendTokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[],
                                          ignore_merges=True))
    backend.decoder = decoders.Fuse()
    return Tokenizer(backend, bos_id=None, eos_id=None)


def encode_all(tokenizer: Tokenizer, text: str) -> torch.Tensor:
    """The ids of ``text`` as one long tensor, or an error naming a character the vocabulary lacks."""
    ids = tokenizer.encode(text, bos=False)
    if len(ids) != len(text):
        missing = sorted(set(text) - set(tokenizer.backend.get_vocab()))
        raise PotqError(f"the text has characters the model's vocabulary lacks ({''.join(missing)[:20]!r}); "
                        "train on a text with the same alphabet")
    return torch.tensor(ids, dtype=torch.long)
