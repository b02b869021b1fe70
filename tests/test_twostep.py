"""Step 2 (block-wise fine-tuning of the scales) on the real stories260K model."""

import copy
import re

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


@pytest.mark.parametrize("objective", ["mse", "act"])
def test_zero_epochs_reproduce_step1_exactly(stories_float, calib, objective):
    grid = copy.deepcopy(stories_float.model)
    potq.quantize_(grid, potq.PoTConfig(bits=3, group_size=32), method="grid", objective=objective,
                   calibration=calib, progress=False)
    two = copy.deepcopy(stories_float.model)
    potq.quantize_(two, potq.PoTConfig(bits=3, group_size=32), method="twostep", calibration=calib,
                   epochs=0, objective=objective, progress=False)
    a, b = quantized_layers(grid), quantized_layers(two)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name].codes, b[name].codes) and torch.equal(a[name].scales, b[name].scales)


@pytest.mark.parametrize("grad", ["detach", "ste"])
def test_step2_never_raises_a_block_loss(stories_float, calib, grad):
    model = copy.deepcopy(stories_float.model)
    potq.quantize_(model, potq.PoTConfig(bits=3, group_size=32), method="twostep", calibration=calib,
                   epochs=3, grad=grad, batch_size=1, progress=False)
    for block in model.potq_report["blocks"]:
        assert len(block["loss"]) == 4  # before + 3 epochs
        assert block["kept"] <= block["loss"][0], block


@pytest.mark.parametrize("decay", ["decoupled", "coupled"])
def test_step2_from_naive_scales_lowers_the_block_loss(stories_float, calib, decay):
    """The ``finetune`` ablation: from round-to-nearest scales the LSQ-like gradient lowers the
    loss, with λ as AdamW's decay or as a penalty in the loss."""
    model = copy.deepcopy(stories_float.model)
    potq.quantize_(model, potq.PoTConfig(bits=3, group_size=32), method="finetune", calibration=calib,
                   epochs=4, grad="detach", decay=decay, batch_size=1, progress=False)
    before = sum(b["loss"][0] for b in model.potq_report["blocks"])
    after = sum(b["kept"] for b in model.potq_report["blocks"])
    assert after < before, model.potq_report["blocks"]


def test_twostep_records_calibration(stories, tmp_path):
    potq.quantize_(stories, potq.PoTConfig(bits=3, group_size=32), method="twostep", epochs=1,
                   calib_samples=4, calib_len=32, seed=3, progress=False)
    loaded = potq.load(potq.save(stories, tmp_path / "m"))
    meta = loaded.model.potq_meta
    assert meta["method"] == "twostep"
    assert meta["method_settings"] == {"epochs": 1, "lr": 1e-3, "weight_decay": 0.1, "decay": "decoupled",
                                       "grad": "detach", "batch_size": 4, "target": "same-input", "init": "grid",
                                       "objective": "act"}
    assert meta["calibration"]["samples"] == 4 and meta["calibration"]["seed"] == 3


def test_defaults_are_recorded_resolved(stories, calib):
    potq.quantize_(stories, potq.PoTConfig(bits=2, group_size=32), method="finetune", calibration=calib[:2, :16],
                   epochs=None, progress=False)  # None: the thesis' schedule, 40 epochs at 2 bits
    settings = stories.model.potq_meta["method_settings"]
    assert settings["epochs"] == 40 and settings["init"] == "rtn" and settings["objective"] is None
    assert len(stories.model.potq_report["blocks"][0]["loss"]) == 41


def test_a_setting_the_method_does_not_take_is_one_clear_error(stories):
    with pytest.raises(potq.PotqError, match="method 'rtn' has no setting 'epochs'"):
        potq.quantize_(stories, potq.PoTConfig(bits=3), method="rtn", epochs=3)


@pytest.mark.parametrize("setting, message", [
    ({"act_order": "False"}, "setting 'act_order' must be bool like its default True, got 'False'"),
    ({"damp": "0.1"}, "setting 'damp' must be float like its default 0.01, got '0.1'"),
    ({"batch_size": 2.5}, "setting 'batch_size' must be int like its default 8, got 2.5"),
])
def test_a_setting_of_the_wrong_type_is_one_clear_error(stories, setting, message):
    """A string "False" would be truthy inside the method: refused before any work is done."""
    with pytest.raises(potq.PotqError, match=re.escape(f"method 'gptq' {message}")):
        potq.quantize_(stories, potq.UniformConfig(bits=4), method="gptq", **setting)


def test_activation_weighted_grid_minimises_the_weighted_error(stories_float, calib):
    """``objective="act"``: block 0 sees the float embeddings, so its E[x²] is computable here,
    and the searched scales must beat plain-MSE scales on the E[x²]-weighted error."""
    from potq.engine.blocks import capture_inputs, input_moments
    from potq.formats import get_format
    from potq.formats.weights import fake_quantize, init_qparams
    from potq.methods.grid import search_scales
    from potq.models import transformer_blocks

    float_model = stories_float.model
    block = transformer_blocks(float_model)[0]
    moments = input_moments(block, capture_inputs(float_model, calib, 8))
    act = copy.deepcopy(float_model)
    potq.quantize_(act, potq.PoTConfig(bits=3, group_size=32), method="grid", objective="act",
                   calibration=calib, progress=False)
    assert act.potq_meta["method_settings"]["objective"] == "act"
    fmt = get_format("pot", 3)
    for name, weight in moments.items():
        w = block.get_submodule(name).weight.detach()
        deq = act.get_submodule(f"model.layers.0.{name}").dequantize()
        plain = fake_quantize(w, fmt, 32, fmt.as_stored(search_scales(w, fmt, 32)[0]))
        weighted = lambda q: float(((q - w) ** 2 * weight).sum())  # noqa: E731
        assert weighted(deq) <= weighted(plain) * 1.001, name
        assert weighted(deq) <= weighted(fake_quantize(w, fmt, 32, fmt.as_stored(init_qparams(w, fmt, 32)))) * 1.001
