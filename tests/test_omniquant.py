"""OmniQuant-style learnable weight clipping (LWC) on stories260K, uniform and PoT."""

import copy

import pytest

import potq
from potq.eval.data import calibration_batch
from potq.nn import QuantLinear


@pytest.mark.parametrize("name", ["uniform", "pot"])
def test_lwc_lowers_the_block_loss(stories_float, name):
    calib = calibration_batch(stories_float.tokenizer, 4, 64, seed=0)
    model = copy.deepcopy(stories_float.model)
    potq.quantize_(model, potq.QuantConfig(name, 3, 32), method="omniquant", calibration=calib, epochs=3,
                   batch_size=1, progress=False)
    assert all(isinstance(m, QuantLinear) for n, m in model.named_modules() if n.endswith("proj"))
    blocks = model.potq_report["blocks"]
    assert len(blocks) == 5 and all(len(b["loss"]) == 4 for b in blocks)
    assert all(b["kept"] <= b["loss"][0] for b in blocks)
    assert sum(b["kept"] for b in blocks) < sum(b["loss"][0] for b in blocks), blocks
    settings = model.potq_meta["method_settings"]
    assert settings["grad"] == {"uniform": "ste", "pot": "detach"}[name]  # log rounding: held codes
    assert (settings["epochs"], settings["lr"]) == (3, 1e-2)
