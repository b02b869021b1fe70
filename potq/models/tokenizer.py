"""One tokenizer type for every model potq loads.

Every loader (GGUF metadata, llama2.c ``tok*.bin``, a Hugging Face folder) turns its vocabulary
into a ``tokenizers.Tokenizer``, so evaluation, generation and storage deal with one class, and a
saved model carries its tokenizer as a plain ``tokenizer.json`` — loading never needs the source.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from potq.errors import PotqError

TOKENIZER_FILE = "tokenizer.json"
SPECIALS_FILE = "tokenizer_specials.json"


class Tokenizer:
    """Text <-> token ids, plus the ids of the begin/end-of-sequence tokens (``None`` if absent)."""

    def __init__(self, backend: _HFTokenizer, bos_id: int | None, eos_id: int | None,
                 add_bos: bool = False) -> None:
        self.backend = backend
        self.bos_id = bos_id
        self.eos_id = eos_id
        # llama2.c / sentencepiece models were trained with BOS at the start of every text.
        self.add_bos = add_bos

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; a BOS id is prepended when ``bos`` (default: the model's habit)."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos if bos is None else bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=True)

    def save(self, folder: Path) -> None:
        """Write ``tokenizer.json`` and the special-token ids into ``folder``."""
        folder = Path(folder)
        self.backend.save(str(folder / TOKENIZER_FILE))
        specials = {"bos_id": self.bos_id, "eos_id": self.eos_id, "add_bos": self.add_bos}
        (folder / SPECIALS_FILE).write_text(json.dumps(specials, indent=1))

    @classmethod
    def load(cls, folder: Path) -> "Tokenizer":
        folder = Path(folder)
        try:
            backend = _HFTokenizer.from_file(str(folder / TOKENIZER_FILE))
            specials = json.loads((folder / SPECIALS_FILE).read_text())
        except (OSError, ValueError, Exception) as exc:  # tokenizers raises a bare Exception
            raise PotqError(f"cannot read the tokenizer in {folder}: {exc}; re-save the model") from None
        return cls(backend, specials.get("bos_id"), specials.get("eos_id"), bool(specials.get("add_bos")))
