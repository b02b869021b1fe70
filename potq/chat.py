"""``potq chat MODEL``: talk to an instruct model in the terminal.

Each turn renders the whole conversation with the model's own chat template
(:meth:`potq.models.tokenizer.Tokenizer.apply_chat_template`, sandboxed) and streams the answer
token by token through :func:`potq.eval.generate`. Ctrl-C stops the answer being written (what
was written stays in the conversation), not the program; Ctrl-D or ``/exit`` ends it, ``/reset``
forgets the conversation. When the conversation outgrows the model's context, the oldest turns
are dropped (a system message stays).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from potq.errors import PotqError
from potq.eval.generate import generate
from potq.eval.perplexity import max_positions
from potq.models import LoadedModel

EXIT, RESET = "/exit", "/reset"


@dataclass
class Sampling:
    """How each answer is drawn (0 = greedy) and how long it may get."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int | None = None
    seed: int | None = None


@dataclass
class Conversation:
    """The messages so far, rendered for the model with its template."""

    lm: LoadedModel
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)

    def prompt(self, budget: int | None) -> str:
        """The conversation as the model's text; the oldest turns dropped while it is over ``budget`` tokens."""
        while True:
            head = [{"role": "system", "content": self.system}] if self.system else []
            text = self.lm.tokenizer.apply_chat_template(head + self.messages)
            if budget is None or len(self.lm.tokenizer.encode(text)) <= budget or len(self.messages) <= 1:
                return text
            self.messages = self.messages[2:] if len(self.messages) > 2 else self.messages[1:]


def chat(lm: LoadedModel, read: Callable[[str], str] = input, write: Callable[[str], None] | None = None,
         sampling: Sampling | None = None, system: str | None = None) -> Conversation:
    """Run the conversation until end of input or ``/exit``; returns it (for tests and callers)."""
    if lm.tokenizer.chat_template is None:
        raise PotqError("this model has no chat template (a base model?): use `potq generate --prompt ...`")
    write = write or (lambda text: print(text, end="", flush=True))
    sampling = sampling or Sampling()
    conversation = Conversation(lm, system)
    limit = max_positions(lm.model)
    budget = None if limit is None else limit - sampling.max_new_tokens
    if budget is not None and budget < 1:
        raise PotqError(f"--max-new-tokens {sampling.max_new_tokens} leaves no room in the model's {limit} positions")
    while True:
        try:
            line = read("> ").strip()
        except EOFError:
            write("\n")
            return conversation
        except KeyboardInterrupt:  # at the prompt: a fresh line, as a shell does
            write("\n")
            continue
        if line == EXIT:
            return conversation
        if line == RESET:
            conversation.messages = []
            continue
        if not line:
            continue
        conversation.messages.append({"role": "user", "content": line})
        pieces: list[str] = []

        def show(piece: str) -> None:
            pieces.append(piece)
            write(piece)

        prompt = conversation.prompt(budget)
        try:
            generate(lm.model, lm.tokenizer, prompt, sampling.max_new_tokens, sampling.temperature, sampling.top_k,
                     sampling.seed, stream=show, bos=lm.tokenizer.bos_for(prompt))
        except KeyboardInterrupt:
            write(" [stopped]")
        write("\n")
        conversation.messages.append({"role": "assistant", "content": "".join(pieces)})
