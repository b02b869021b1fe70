"""Step 2 (block-wise fine-tuning of the scales) on the real stories260K model."""

import copy

import pytest
import torch

import potq
from potq.eval.data import calibration_batch
from potq.nn import QuantLinear


@pytest.fixture(scope="module")
def calib(stories_float):
    return calibration_batch(stories_float.tokenizer, 8, 64, seed=0)


def quantized_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def test_zero_epochs_reproduce_step1_exactly(stories_float, calib):
    grid = copy.deepcopy(stories_float.model)
    potq.quantize_(grid, potq.PoTConfig(bits=3, group_size=32), method="grid", progress=False)
    two = copy.deepcopy(stories_float.model)
    potq.quantize_(two, potq.PoTConfig(bits=3, group_size=32), method="twostep", calibration=calib,
                   epochs=0, progress=False)
    a, b = quantized_layers(grid), quantized_layers(two)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name].codes, b[name].codes) and torch.equal(a[name].scales, b[name].scales)


@pytest.mark.parametrize("grad", ["detach", "ste"])
def test_step2_never_raises_a_block_loss(stories_float, calib, grad):
    model = copy.deepcopy(stories_float.model)
    potq.quantize_(model, potq.PoTConfig(bits=3, group_size=32), method="twostep", calibration=calib,
                   epochs=3, grad=grad, batch_size=1, progress=False)
    for block in model.potq_report:
        assert len(block["loss"]) == 4  # before + 3 epochs
        assert block["kept"] <= block["loss"][0], block


def test_step2_from_naive_scales_lowers_the_block_loss(stories_float, calib):
    """The ``finetune`` ablation: from round-to-nearest scales the LSQ-like gradient lowers the loss."""
    model = copy.deepcopy(stories_float.model)
    potq.quantize_(model, potq.PoTConfig(bits=3, group_size=32), method="finetune", calibration=calib,
                   epochs=4, grad="detach", batch_size=1, progress=False)
    before = sum(b["loss"][0] for b in model.potq_report)
    after = sum(b["kept"] for b in model.potq_report)
    assert after < before, model.potq_report


def test_twostep_records_calibration(stories, tmp_path):
    potq.quantize_(stories, potq.PoTConfig(bits=3, group_size=32), method="twostep", epochs=1,
                   calib_samples=4, calib_len=32, seed=3, progress=False)
    loaded = potq.load(potq.save(stories, tmp_path / "m"))
    meta = loaded.model.potq_meta
    assert meta["method"] == "twostep" and meta["method_settings"] == {"epochs": 1}
    assert meta["calibration"]["samples"] == 4 and meta["calibration"]["seed"] == 3
