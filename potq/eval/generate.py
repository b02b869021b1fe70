"""Text generation for eyeballing a quantized model: greedy or seeded sampling, with a KV cache.

Llama, Mistral, Qwen2, Qwen3, Phi-3 and Gemma-2/3 models decode natively (:mod:`potq.models.native_decoder`: one C++
call per token); where that cannot run, LLaMA models go through potq's lean Python decoder
(:mod:`potq.models.llama_decoder`, its own KV cache); other transformers models through their forward with a ``DynamicCache``: either way the prompt
is run once and every new token costs a single position; models whose ``forward`` takes no ``past_key_values`` (a plain nanoGPT) fall back to
recomputing the whole sequence each step, which gives the same tokens, only slower.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Callable, Iterator

import torch
from torch import nn
from transformers import DynamicCache

from potq.errors import PotqError
from potq.eval.perplexity import logits_of, max_positions, model_device
from potq.models import llama_decoder, native_decoder

if TYPE_CHECKING:
    from potq.models.tokenizer import Tokenizer

Picker = Callable[[torch.Tensor], int]


def _accepts_cache(model: nn.Module) -> bool:
    return "past_key_values" in inspect.signature(model.forward).parameters


def next_tokens(model: nn.Module, prompt_ids: list[int], steps: int,
                 pick: Picker) -> Iterator[int]:
    """Up to ``steps`` tokens, each chosen by ``pick`` from the logits of the last position."""
    device = model_device(model)
    native = native_decoder.unsupported(model) is None
    if native or llama_decoder.supports(model):
        cls = native_decoder.NativeDecoder if native else llama_decoder.LlamaDecoder
        decoder = cls(model, len(prompt_ids) + steps)
        logits = decoder(torch.tensor([prompt_ids], dtype=torch.long, device=device))
        for _ in range(steps):
            token = pick(logits)
            yield token
            logits = decoder(torch.tensor([[token]], dtype=torch.long, device=device))
        return
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    cache = DynamicCache() if _accepts_cache(model) else None
    for _ in range(steps):
        if cache is None:
            logits = logits_of(model, ids)
        else:  # only the positions the cache has not seen yet: the prompt, then one token
            unseen = ids[:, cache.get_seq_length():]
            logits = model(unseen, past_key_values=cache, use_cache=True).logits
        token = pick(logits[0, -1])
        yield token
        ids = torch.cat([ids, torch.tensor([[token]], dtype=torch.long, device=device)], dim=1)


def _picker(temperature: float, top_k: int | None, seed: int | None,
            device: torch.device) -> Picker:
    """Argmax when ``temperature == 0``; otherwise softmax(logits / T) sampling, restricted to
    the ``top_k`` most likely tokens when given, drawn from a generator seeded with ``seed``."""
    if temperature == 0:
        return lambda logits: int(logits.argmax())
    generator = torch.Generator(device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)

    def sample(logits: torch.Tensor) -> int:
        scaled = logits.float() / temperature
        if top_k is not None and top_k < scaled.numel():
            kth = torch.topk(scaled, top_k).values[-1]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        return int(torch.multinomial(torch.softmax(scaled, dim=-1), 1, generator=generator))

    return sample


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None) -> None:
    if max_new_tokens < 1:
        raise PotqError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    if temperature < 0:
        raise PotqError(f"--temperature must be >= 0 (got {temperature}); 0 means greedy")
    if top_k is not None and top_k < 1:
        raise PotqError(f"--top-k must be at least 1 (got {top_k})")


def _continuation(tokenizer: Tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text the new tokens add after the prompt.

    Decoded together with the prompt, because SentencePiece-style decoders drop the leading space
    of a sequence's first word: decoding the new tokens alone would glue them to the prompt.
    """
    base = tokenizer.decode(prompt_ids)
    full = tokenizer.decode(prompt_ids + new_ids)
    return full[len(base):] if full.startswith(base) else tokenizer.decode(new_ids)


def _stream_more(stream: Callable[[str], None], text: str, sent: str, final: bool = False) -> str:
    """Send ``stream`` what ``text`` adds to the already ``sent`` text; returns the text now sent.
    Until ``final``, a trailing U+FFFD (a byte-fallback character still missing bytes) waits."""
    incomplete = text.endswith("\ufffd") and not final
    if len(text) <= len(sent) or not text.startswith(sent) or incomplete:
        return sent
    stream(text[len(sent):])
    return text


def generate(model: nn.Module, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int | None = None, seed: int | None = None,
             stream: Callable[[str], None] | None = None, bos: bool | None = None,
             generated: list[int] | None = None) -> str:
    """The continuation of ``prompt`` (without the prompt), stopping early at EOS.

    ``bos``: whether to start the prompt with BOS (default: the tokenizer's habit; a chat
    template writes its own). ``generated``, when given, receives the new token ids (EOS not
    included), so a caller can count them and tell a stop from the length limit.

    ``stream`` receives each new piece of text as soon as it is complete (a piece ending in a
    half-decoded multi-byte character is held back until the character is whole); the pieces
    concatenate to the returned text. The model is put in eval mode.
    """
    check_sampling(max_new_tokens, temperature, top_k)
    prompt_ids = tokenizer.encode(prompt, bos=bos)
    if not prompt_ids:
        raise PotqError("the prompt is empty and the tokenizer adds no BOS: give a prompt")
    limit = max_positions(model)
    if limit is not None and len(prompt_ids) + max_new_tokens > limit:
        raise PotqError(f"prompt ({len(prompt_ids)} tokens) + --max-new-tokens {max_new_tokens} "
                        f"exceeds the model's {limit} positions: shorten them")

    model.eval()
    pick = _picker(temperature, top_k, seed, model_device(model))
    new_ids: list[int] = [] if generated is None else generated
    sent = ""
    with torch.inference_mode():
        for token in next_tokens(model, prompt_ids, max_new_tokens, pick):
            if token == tokenizer.eos_id:
                break
            new_ids.append(token)
            if stream is not None:
                sent = _stream_more(stream, _continuation(tokenizer, prompt_ids, new_ids), sent)
    text = _continuation(tokenizer, prompt_ids, new_ids)
    if stream is not None:
        _stream_more(stream, text, sent, final=True)
    return text
