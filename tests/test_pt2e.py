"""The PT2E flow: potq formats through torch.export + torchao prepare/convert, on the char model."""

import copy

import pytest
import torch

import potq
from potq.cli import main
from potq.errors import PotqError
from potq.eval.data import training_batch
from potq.pt2e import TorchInt, graph_summary, quantize_pt2e


@pytest.fixture
def ids(char_model):
    return training_batch(char_model.tokenizer, char_model.source, 3, 64, seed=1)


@pytest.mark.parametrize("config, embeddings", [
    (potq.QuantConfig("pot-seed", 5, -1), False),
    (potq.QuantConfig("pot-seed", 5, -1, {"epsilon": 0.01}), True),
    (potq.QuantConfig("pot", 3, 32), True),
    (potq.QuantConfig("uniform", 4, 64), False),
])
def test_converted_graph_matches_potq_fake_quant(char_model, ids, config, embeddings):
    gm = quantize_pt2e(char_model, config, embeddings=embeddings)
    reference = copy.deepcopy(char_model.model)
    potq.quantize_(reference, config, embeddings=embeddings, progress=False)
    with torch.no_grad():
        exported, ours, float_ = gm(ids), reference(ids).logits, char_model.model(ids).logits
    assert torch.allclose(exported, ours, atol=1e-5, rtol=1e-5)
    assert (exported - float_).abs().max() > 1e-3  # the weights really are quantized
    summary = graph_summary(gm)
    assert f"{16 + 2 * embeddings} x potq.dequantize.default" in summary  # 4 blocks x 4 linears (+ wte, wpe)
    assert "first quantized linear" in summary


def test_int_weights_and_int8_activations(char_model, ids):
    with torch.no_grad():
        float_ = char_model.model(ids).logits
        errors = {bits: (quantize_pt2e(char_model, TorchInt(bits))(ids) - float_).abs().max().item()
                  for bits in (6, 8, 16)}
        assert errors[16] < errors[8] < errors[6]
        assert errors[16] < 1e-2
        calibration = list(training_batch(char_model.tokenizer, char_model.source, 4, 64, seed=2).split(1))
        gm = quantize_pt2e(char_model, potq.QuantConfig("pot-seed", 5, -1), activations=True, calibration=calibration)
        assert "quantized_decomposed.quantize_per_tensor" in graph_summary(gm)
        assert torch.isfinite(gm(ids)).all()


def test_bad_input(char_model, tmp_path):
    with pytest.raises(PotqError, match="2 to 32 bits"):
        TorchInt(40)
    with pytest.raises(PotqError, match="need calibration batches"):
        quantize_pt2e(char_model, TorchInt(8), activations=True)
    quantized = copy.deepcopy(char_model.model)
    potq.quantize_(quantized, potq.QuantConfig("pot", 4, 32), progress=False)
    with pytest.raises(PotqError, match="load the float model"):
        quantize_pt2e(quantized, TorchInt(8))


def test_cli_prints_graph_and_losses(char_trained, tmp_path, capsys):
    lm, _ = char_trained
    folder = tmp_path / "char"
    potq.save(lm, folder)
    assert main(["pt2e", str(folder), "--bits", "5", "--quantize-embeddings", "--max-windows", "4",
                 "--graph", str(tmp_path / "graph.py")]) == 0
    out = capsys.readouterr().out
    assert "18 x potq.dequantize.default" in out
    assert "float  shakespeare cross-entropy" in out and "pt2e   shakespeare cross-entropy" in out
    assert "torch.ops.potq.dequantize" in (tmp_path / "graph.py").read_text()
