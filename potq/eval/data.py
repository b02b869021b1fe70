"""Evaluation and calibration text, built the way GPTQ's ``datautils`` builds it.

Perplexities are only comparable with published tables when the text is exactly the same string,
tokenised once as a whole. Each data set below therefore reproduces what GPTQ feeds its tokenizer
from the Hugging Face rows, using the local copies in ``shared/data`` (nothing is downloaded).

C4 is split in two fixed halves of ``c4_validation_2k.jsonl``: documents ``0..999`` are for
calibration, ``1000..1999`` for evaluation, so a quantizer never sees the text it is scored on.
"""

from __future__ import annotations

import hashlib
import json
import random
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from potq.errors import PotqError
from potq.paths import shared_file

if TYPE_CHECKING:  # the evaluation code only needs encode/decode, not the model loaders
    from potq.models.tokenizer import Tokenizer

DATASETS = ("wikitext2", "ptb", "c4", "shakespeare", "tinystories")

C4_FILE = "data/c4_validation_2k.jsonl"
SHAKESPEARE_FILE = "data/tinyshakespeare_input.txt"
C4_CALIBRATION_DOCS = 1000
# GPTQ scores C4 on the first 256 windows of its joined validation text only (max_tokens = 256*ctx).
WINDOW_CAP: dict[str, int] = {"c4": 256}


def _wikitext2() -> str:
    """WikiText-2 raw test as GPTQ joins it: ``"\\n\\n".join(rows)``.

    The Hugging Face ``wikitext-2-raw-v1`` test split has one row per line of ``wiki.test.raw``
    (4358 rows): a line keeps its trailing newline, and a whitespace-only line becomes ``""``.
    The joined text therefore starts ``"\\n\\n = Robert Boulter = \\n\\n\\n\\n\\n Robert ..."``.
    """
    with shared_file("data/wikitext2_wiki.test.raw").open(encoding="utf-8") as f:
        rows = [line if line.strip() else "" for line in f]
    return "\n\n".join(rows)


def _ptb() -> str:
    """Penn Treebank test as ``"\\n\\n".join(sentences)``.

    The Hugging Face ``ptb_text_only`` rows are the lines of ``ptb.test.txt`` with ``.strip()``
    applied, so the leading space of every file line is dropped here too. (GPTQ's ``get_ptb``
    joins the *validation* rows this way; we score the test split, as the thesis tables do.)
    """
    with shared_file("data/ptb.test.txt").open(encoding="utf-8") as f:
        return "\n\n".join(line.strip() for line in f)


@lru_cache(maxsize=1)
def _c4_documents() -> tuple[str, ...]:
    with shared_file(C4_FILE).open(encoding="utf-8") as f:
        return tuple(json.loads(line)["text"] for line in f if line.strip())


def _c4() -> str:
    """The evaluation half of C4 (documents 1000..1999) joined with a space, as GPTQ does.

    GPTQ also keeps only the first 256 windows of the tokenised text; that cap is ``WINDOW_CAP``,
    applied by :func:`potq.eval.perplexity` because it depends on the context length.
    """
    return " ".join(_c4_documents()[C4_CALIBRATION_DOCS:])


def split_text(text: str) -> dict[str, str]:
    """The 80/10/10 character split of a training text: ``train``, ``val``, ``test``.

    The test part is the last 10 %, which is also the validation part of nanoGPT's 90/10 split
    (``data[int(n * 0.9):]``), so a char nanoGPT trained by either recipe never saw it.
    """
    n = len(text)
    return {"train": text[:int(n * 0.8)], "val": text[int(n * 0.8):int(n * 0.9)], "test": text[int(n * 0.9):]}


def shakespeare_text() -> str:
    """Tiny Shakespeare, whole (the char nanoGPT's training text)."""
    return shared_file(SHAKESPEARE_FILE).read_text(encoding="utf-8")


def _shakespeare() -> str:
    """The test part of tiny Shakespeare (:func:`split_text`)."""
    return split_text(shakespeare_text())["test"]


def _tinystories() -> str:
    """The head of the TinyStories validation set, whole."""
    return shared_file("data/tinystories_valid_head.txt").read_text(encoding="utf-8")


_BUILDERS: dict[str, Callable[[], str]] = {
    "wikitext2": _wikitext2, "ptb": _ptb, "c4": _c4,
    "shakespeare": _shakespeare, "tinystories": _tinystories,
}


def eval_text(name: str) -> str:
    """The whole evaluation text of data set ``name`` (one of :data:`DATASETS`)."""
    if name not in _BUILDERS:
        raise PotqError(f"unknown data set {name!r}: choose one of {', '.join(DATASETS)}")
    text = _BUILDERS[name]()
    if not text.strip():
        raise PotqError(f"the {name} text is empty: check the shared data files "
                        f"(valid data sets: {', '.join(DATASETS)})")
    return text


def calibration_texts() -> list[str]:
    """The calibration half of C4 (documents 0..999); never overlaps ``eval_text("c4")``."""
    return list(_c4_documents()[:C4_CALIBRATION_DOCS])


def home_dataset(source: dict) -> str:
    """The evaluation set a model is scored on by default, the kind of text it was trained on: a
    char model trained here on tiny Shakespeare is scored on its held-out split, a TinyStories
    model (llama2.c's stories*, by name) on TinyStories, every other model on WikiText-2."""
    if source.get("loader") == "potq train-char":
        return "shakespeare"
    names = (str(source.get("name") or ""), Path(str(source.get("path") or "")).name)
    return "tinystories" if any(n.lower().startswith("stories") for n in names) else "wikitext2"


def training_batch(tokenizer: Tokenizer, source: dict, n: int, seqlen: int, seed: int) -> torch.LongTensor:
    """Windows a model may learn or calibrate from, never evaluation text: for a char model
    trained here (``source["loader"] == "potq train-char"``) the train split of its own text,
    for every other model the calibration half of C4 (:func:`calibration_batch`)."""
    if source.get("loader") != "potq train-char":
        return calibration_batch(tokenizer, n, seqlen, seed)
    ids = tokenizer.encode(split_text(char_training_text(source))["train"], bos=False)
    if len(ids) <= seqlen:
        raise PotqError(f"the training text has fewer than {seqlen} tokens: lower the sequence length")
    rng = random.Random(seed)
    return torch.tensor([ids[s:s + seqlen] for s in (rng.randrange(len(ids) - seqlen) for _ in range(n))])


def char_training_text(source: dict) -> str:
    """The text a char model trained here learned from: the shared tiny Shakespeare, recognised by
    the sha256 its folder records. A path from a model's metadata is never opened (a folder from
    elsewhere could point it at any file on disk)."""
    path = shared_file(SHAKESPEARE_FILE)
    raw = path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != source.get("sha256"):
        raise PotqError("this char model was trained on a text other than the shared tiny Shakespeare "
                        "(its sha256 differs); potq calibrates char models only on that text")
    return raw.decode("utf-8")


def calibration_batch(tokenizer: Tokenizer, n: int, seqlen: int, seed: int) -> torch.LongTensor:
    """``n`` random windows of ``seqlen`` tokens from the calibration documents, ``[n, seqlen]``.

    GPTQ's C4 sampler: pick a document uniformly, re-pick while it has fewer than ``seqlen``
    tokens, then take a window at a uniform random start. Documents are tokenised without BOS
    (windows start mid-document) and only when first picked; a document found too short is
    dropped from the candidates, so the loop ends with an error instead of spinning when no
    document is long enough. The same ``seed`` always gives the same batch.
    """
    if n < 1 or seqlen < 1:
        raise PotqError(f"calibration needs n >= 1 and seqlen >= 1 (got n={n}, seqlen={seqlen})")
    docs = calibration_texts()
    rng = random.Random(seed)
    candidates = list(range(len(docs)))
    encoded: dict[int, list[int]] = {}
    rows = []
    while len(rows) < n:
        if not candidates:
            raise PotqError(f"no calibration document has {seqlen} tokens: "
                            "lower the sequence length")
        pick = rng.randrange(len(candidates))
        doc = candidates[pick]
        if doc not in encoded:
            encoded[doc] = tokenizer.encode(docs[doc], bos=False)
        ids = encoded[doc]
        if len(ids) < seqlen:
            candidates.pop(pick)
            continue
        start = rng.randint(0, len(ids) - seqlen)
        rows.append(ids[start:start + seqlen])
    return torch.tensor(rows, dtype=torch.long)
