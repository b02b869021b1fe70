"""Evaluation: GPTQ-protocol perplexity, text generation, and the evaluation/calibration text."""

from potq.eval.data import DATASETS, calibration_batch, calibration_texts, eval_text
from potq.eval.generate import generate
from potq.eval.perplexity import PerplexityResult, perplexity

__all__ = ["DATASETS", "PerplexityResult", "calibration_batch", "calibration_texts", "eval_text",
           "generate", "perplexity"]
