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
                 add_bos: bool = False, chat_template: str | None = None) -> None:
        self.backend = backend
        self.bos_id = bos_id
        self.eos_id = eos_id
        # llama2.c / sentencepiece models were trained with BOS at the start of every text.
        self.add_bos = add_bos
        # the model's own Jinja template for a conversation (an instruct model's), or None
        self.chat_template = chat_template

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
        specials = {"bos_id": self.bos_id, "eos_id": self.eos_id, "add_bos": self.add_bos,
                    "chat_template": self.chat_template}
        (folder / SPECIALS_FILE).write_text(json.dumps(specials, indent=1))

    def bos_for(self, text: str) -> bool | None:
        """Whether to add BOS when encoding ``text``: not when it already starts with the BOS token
        (a chat template that writes it), else the model's habit (None)."""
        bos = None if self.bos_id is None else self.backend.id_to_token(self.bos_id)
        return False if bos and text.startswith(bos) else None

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """``messages`` (``{"role": ..., "content": ...}``) as the text the model was tuned on.

        The template comes with the model, so it is data from whoever made the file: it runs in
        Jinja's immutable sandbox (as transformers runs it), which gives it no access to Python.
        """
        if self.chat_template is None:
            raise PotqError("this model has no chat template (not an instruct model?): give it plain text")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        special = lambda i: None if i is None else self.backend.id_to_token(i)  # noqa: E731
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=special(self.bos_id) or "", eos_token=special(self.eos_id) or "")
        except TemplateError as exc:
            raise PotqError(f"the model's chat template failed: {str(exc)[:200]}") from None

    @classmethod
    def load(cls, folder: Path) -> "Tokenizer":
        """The tokenizer saved in ``folder``: regular files of bounded size only (a FIFO or a
        device in their place is refused, not waited on), ids checked to be ids."""
        from potq.limits import MAX_TOKENIZER_BYTES, load_json_object, read_small_file

        folder = Path(folder)
        raw = read_small_file(folder / TOKENIZER_FILE, "the tokenizer", MAX_TOKENIZER_BYTES)
        specials = load_json_object(read_small_file(folder / SPECIALS_FILE, "the tokenizer's special ids"),
                                    str(folder / SPECIALS_FILE))
        try:
            backend = _HFTokenizer.from_str(raw.decode("utf-8"))
        except Exception as exc:  # tokenizers raises a bare Exception for malformed files
            raise PotqError(f"cannot read the tokenizer in {folder} ({str(exc)[:120]!r}); re-save the model") from None
        ids = [specials.get("bos_id"), specials.get("eos_id")]
        template = specials.get("chat_template")
        if any(i is not None and (isinstance(i, bool) or not isinstance(i, int)) for i in ids) or \
                not isinstance(specials.get("add_bos", False), bool) or not isinstance(template, (str, type(None))):
            raise PotqError(f"{folder / SPECIALS_FILE} holds ids that are not token ids; re-save the model")
        return cls(backend, ids[0], ids[1], specials.get("add_bos", False), template)
