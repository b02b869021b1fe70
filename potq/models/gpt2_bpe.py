"""GPT-2's byte-level BPE, built from the local vocabulary in ``shared/tokenizers/gpt2``.

``encoder.json`` (token -> id) and ``vocab.bpe`` (merges) are the same ranks tiktoken's ``gpt2``
encoding uses; built here with the ``tokenizers`` library, the tokenizer saves as a plain
``tokenizer.json`` like every potq tokenizer, and nothing is fetched (tests check it encodes
exactly as a tiktoken ``Encoding`` made from the same two files).
"""

from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers

from potq.errors import PotqError, first_line
from potq.models.tokenizer import Tokenizer
from potq.paths import shared_file

VOCAB, MERGES = "tokenizers/gpt2/encoder.json", "tokenizers/gpt2/vocab.bpe"
END_OF_TEXT, END_OF_TEXT_ID = "<|endoftext|>", 50256


@lru_cache(maxsize=1)
def _backend_json() -> str:
    try:
        bpe = models.BPE.from_file(str(shared_file(VOCAB)), str(shared_file(MERGES)))
    except Exception as exc:  # tokenizers raises a bare Exception for a malformed file
        raise PotqError(f"cannot read the GPT-2 BPE in the shared folder ({first_line(exc)})") from None
    backend = BackendTokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([END_OF_TEXT])
    return backend.to_str()


def gpt2_tokenizer() -> Tokenizer:
    """GPT-2's tokenizer; ``<|endoftext|>`` (50256) is both BOS and EOS, and no text starts with it."""
    return Tokenizer(BackendTokenizer.from_str(_backend_json()), END_OF_TEXT_ID, END_OF_TEXT_ID, add_bos=False)
