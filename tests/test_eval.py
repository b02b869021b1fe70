"""Tests for potq.eval: evaluation text, GPTQ-protocol perplexity, generation, calibration."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from potq.errors import PotqError
from potq.eval import (DATASETS, calibration_batch, calibration_texts, eval_text, generate,
                       perplexity)
from potq.paths import shared_file


@pytest.fixture(scope="module")
def lm(stories_float):
    """The real stories260K model and tokenizer, shared from conftest: these tests only read it."""
    return stories_float.model, stories_float.tokenizer


@pytest.fixture(scope="module")
def short_story() -> str:
    """About 2000 tokens of TinyStories: a dozen short windows (each forward costs ~40 ms)."""
    return eval_text("tinystories")[:4000]


def _c4_file_documents() -> list[str]:
    with shared_file("data/c4_validation_2k.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


# --- evaluation text -------------------------------------------------------------------------

@pytest.mark.parametrize("name", DATASETS)
def test_eval_text_is_not_empty(name: str) -> None:
    assert eval_text(name).strip()


def test_wikitext2_is_joined_like_gptq() -> None:
    text = eval_text("wikitext2")
    # Rows "", " = Robert Boulter = \n", "", " Robert Boulter is ..." joined with "\n\n".
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English")
    assert text.count("\n\n") >= 4357


def test_ptb_rows_are_stripped_and_joined() -> None:
    assert eval_text("ptb").startswith("no it was n't black monday\n\nbut while the new york")


def test_shakespeare_is_the_last_tenth() -> None:
    full = shared_file("data/tinyshakespeare_input.txt").read_text(encoding="utf-8")
    text = eval_text("shakespeare")
    assert full.endswith(text) and len(text) == len(full) - int(len(full) * 0.9)


def test_c4_halves_never_share_a_document() -> None:
    docs = _c4_file_documents()
    calibration = calibration_texts()
    assert calibration == docs[:1000]
    assert eval_text("c4") == " ".join(docs[1000:])
    assert not set(calibration) & set(docs[1000:])


def test_unknown_dataset_lists_the_valid_names() -> None:
    with pytest.raises(PotqError, match="wikitext2, ptb, c4, shakespeare, tinystories"):
        eval_text("imagenet")


# --- perplexity ------------------------------------------------------------------------------

def test_perplexity_counts_windows_and_tokens(lm, short_story: str) -> None:
    model, tok = lm
    n_ids = len(tok.encode(short_story))
    result = perplexity(model, tok, "tinystories", ctx=128, dtype="fp32", progress=False,
                        text=short_story)
    assert math.isfinite(result.ppl) and 1 < result.ppl < 50  # stories260K: ~5 on TinyStories
    assert result.total_windows == result.windows == n_ids // 128
    assert result.tokens == result.windows * 127
    assert result.ppl == pytest.approx(math.exp(result.nll))
    assert result.to_dict()["ctx"] == 128 and result.tokens_per_s > 0

    capped = perplexity(model, tok, "tinystories", ctx=128, max_windows=3, dtype="fp32",
                        progress=False, text=short_story)
    assert capped.windows == 3 and capped.tokens == 3 * 127
    assert capped.total_windows == result.total_windows


def test_perplexity_matches_a_direct_cross_entropy(lm, short_story: str) -> None:
    model, tok = lm
    ids = torch.tensor(tok.encode(short_story)[:128])  # one BOS, at the start of the stream
    assert ids[0] == tok.bos_id and (ids[1:] != tok.bos_id).all()
    with torch.no_grad():
        logits = model(ids[None]).logits[0]
    expected = math.exp(F.cross_entropy(logits[:-1], ids[1:]).item())
    result = perplexity(model, tok, "tinystories", ctx=128, max_windows=1, dtype="fp32",
                        progress=False, text=short_story)
    assert result.ppl == pytest.approx(expected, rel=1e-5)


def test_bf16_is_close_to_fp32(lm, short_story: str) -> None:
    model, tok = lm
    runs = {dtype: perplexity(model, tok, "tinystories", ctx=128, max_windows=4, dtype=dtype,
                              progress=False, text=short_story).ppl for dtype in ("fp32", "bf16")}
    assert runs["bf16"] == pytest.approx(runs["fp32"], rel=0.02)


def test_c4_keeps_gptqs_first_256_windows(lm) -> None:
    model, tok = lm
    result = perplexity(model, tok, "c4", ctx=64, max_windows=1, progress=False)
    assert result.total_windows == 256 and result.windows == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"ctx": 4096}, "exceeds the model's 2048 positions"),
    ({"ctx": 1}, "at least 2"),
    ({"ctx": 256, "text": "Once upon a time."}, "lower --ctx"),
    ({"dtype": "fp8"}, "unknown dtype"),
    ({"max_windows": 0}, "--max-windows"),
])
def test_perplexity_rejects_bad_arguments(lm, short_story: str, kwargs, message: str) -> None:
    model, tok = lm
    args = {"ctx": 64, "progress": False, "text": short_story, **kwargs}
    with pytest.raises(PotqError, match=message):
        perplexity(model, tok, "tinystories", **args)


# --- generation ------------------------------------------------------------------------------

PROMPT = "Once upon a time, there was a little"


class _NoCache(nn.Module):
    """A nanoGPT-like view of the model: ``forward(ids)`` returns logits, takes no cache."""

    def __init__(self, inner: nn.Module, boost: int | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.boost = boost

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.inner(ids).logits
        if self.boost is not None:
            logits[..., self.boost] += 1e4
        return logits


def test_greedy_equals_an_argmax_loop_without_cache(lm) -> None:
    model, tok = lm
    prompt_ids = tok.encode(PROMPT)
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(24):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == tok.eos_id:
                break
            ids.append(nxt)
    expected = tok.decode(ids)[len(tok.decode(prompt_ids)):]

    text = generate(model, tok, PROMPT, max_new_tokens=24)
    assert text == expected
    assert generate(model, tok, PROMPT, max_new_tokens=24) == text
    assert generate(_NoCache(model), tok, PROMPT, max_new_tokens=24) == text


def test_sampling_repeats_with_a_seed(lm) -> None:
    model, tok = lm
    sample = {"max_new_tokens": 16, "temperature": 1.0}
    first = generate(model, tok, PROMPT, top_k=50, seed=0, **sample)
    assert generate(model, tok, PROMPT, top_k=50, seed=0, **sample) == first
    others = {generate(model, tok, PROMPT, seed=s, **sample) for s in range(1, 4)}
    assert others - {first}


def test_stream_pieces_make_up_the_text(lm) -> None:
    model, tok = lm
    pieces: list[str] = []
    text = generate(model, tok, PROMPT, max_new_tokens=16, temperature=0.8, seed=3,
                    stream=pieces.append)
    assert "".join(pieces) == text and len(pieces) > 1


def test_generation_stops_at_eos(lm) -> None:
    model, tok = lm
    assert generate(_NoCache(model, boost=tok.eos_id), tok, PROMPT, max_new_tokens=8) == ""


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": 0}, "--max-new-tokens"),
    ({"temperature": -1.0}, "--temperature"),
    ({"temperature": 1.0, "top_k": 0}, "--top-k"),
    ({"max_new_tokens": 3000}, "2048 positions"),
])
def test_generate_rejects_bad_arguments(lm, kwargs, message: str) -> None:
    model, tok = lm
    with pytest.raises(PotqError, match=message):
        generate(model, tok, PROMPT, **kwargs)


# --- calibration -----------------------------------------------------------------------------

def test_calibration_batch_is_seeded_windows_of_calibration_documents(lm) -> None:
    _, tok = lm
    batch = calibration_batch(tok, n=8, seqlen=64, seed=0)
    assert batch.shape == (8, 64) and batch.dtype == torch.long
    assert torch.equal(batch, calibration_batch(tok, n=8, seqlen=64, seed=0))
    assert not torch.equal(batch, calibration_batch(tok, n=8, seqlen=64, seed=1))

    as_text = lambda ids: "," + ",".join(map(str, ids)) + ","  # noqa: E731 - token-run search
    calibration = "|".join(as_text(tok.encode(doc, bos=False)) for doc in calibration_texts())
    assert all(as_text(row.tolist()) in calibration for row in batch)


def test_calibration_batch_needs_long_enough_documents(lm) -> None:
    _, tok = lm
    with pytest.raises(PotqError, match="lower the sequence length"):
        calibration_batch(tok, n=1, seqlen=1_000_000, seed=0)


def test_lean_llama_decoder_matches_transformers(stories_float):
    """potq's LLaMA decoder (used by generate) gives transformers' logits, prompt then one token a
    step, for the float model and a packed PoT one — embeddings too, ragged groups — with the
    extension's kernels and decoding-step ops, and with PyTorch's ops only."""
    import copy

    import potq
    from potq.kernels import fused
    from potq.models.llama_decoder import LlamaDecoder, supports

    ids = torch.tensor([stories_float.tokenizer.encode("Once upon a time there was a little")])
    for quantized, kernel in ((False, True), (True, True), (False, False), (True, False)):
        model = copy.deepcopy(stories_float.model)
        if quantized:
            potq.quantize_(model, potq.QuantConfig("pot", 3, 48), method="rtn", embeddings=True, progress=False)
        assert supports(model)
        with torch.inference_mode(), fused.enabled(kernel):
            reference = model(ids).logits[0, 4:]
            decoder = LlamaDecoder(model, ids.shape[1])
            assert (decoder.attend_step is not None) == (kernel and fused.extension() is not None)
            got = torch.stack([decoder(ids[:, :5])] + [decoder(ids[:, t:t + 1]) for t in range(5, ids.shape[1])])
        assert torch.allclose(got, reference, atol=1e-4), (quantized, kernel, (got - reference).abs().max())
