"""ROUGE-L and BERTScore with the locally bundled encoder."""

import pytest

from potq.errors import PotqError
from potq.eval.similarity import bert_score, rouge_l


def test_identical_texts_score_one_and_unrelated_texts_less():
    ref = ["The cat sat on the mat and looked at the garden.", "Once upon a time there was a little girl."]
    assert rouge_l(ref, ref) == pytest.approx(1.0)
    same = bert_score(ref, ref)
    assert same.f1 == pytest.approx(1.0, abs=1e-5)
    close = bert_score(["The cat sat on a mat, looking at the garden.", "Once upon a time there lived a girl."], ref)
    far = bert_score(["Quarterly revenue rose four percent on strong demand.", "zzz qqq 12345"], ref)
    assert 1.0 > close.f1 > far.f1
    assert rouge_l(["Quarterly revenue rose.", "zzz"], ref) < rouge_l(["The cat sat on a mat.", "Once upon a time"], ref)


def test_mismatched_lists():
    with pytest.raises(PotqError, match="as many candidates as references"):
        rouge_l(["a"], [])
