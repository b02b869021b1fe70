"""PoT-QAT: the fake-quant forward is what gets packed, and a short run recovers PTQ loss."""

import copy

import pytest
import torch

import potq
from potq.cli import main
from potq.eval import perplexity
from potq.formats import get_format
from potq.methods.qat import FakeQuantLinear, starting_scales
from potq.nn import QuantLinear


@pytest.mark.parametrize("name, bits, learned", [("pot", 3, True), ("pot", 2, False), ("uniform", 4, True),
                                                 ("pot-zero", 3, True)])
def test_fake_quant_forward_is_exactly_the_packed_layer(name, bits, learned):
    torch.manual_seed(bits)
    linear = torch.nn.Linear(96, 24)
    fmt = get_format(name, bits)
    layer = FakeQuantLinear(linear, fmt, 32, starting_scales(linear.weight.detach(), fmt, 32), learned)
    if learned:
        with torch.no_grad():
            layer.gamma.uniform_(-0.3, 0.3)
    x = torch.randn(5, 96)
    packed = QuantLinear.from_quantized(layer.quantized(), linear.bias)
    assert torch.allclose(layer(x), packed(x), atol=1e-6)
    layer(x).sum().backward()  # gradients reach the master weight, and the scales when learned
    assert linear.weight.grad.abs().sum() > 0
    assert (layer.gamma.grad.abs().sum() > 0) if learned else layer.gamma is None


@pytest.fixture(scope="module")
def story_halves(stories_float):
    """TinyStories split in two: QAT trains on windows of the second half, loss is measured on the first."""
    text = potq.eval.eval_text("tinystories")
    ids = torch.tensor(stories_float.tokenizer.encode(text[len(text) // 2:]))
    return text[:len(text) // 2], ids[:len(ids) // 128 * 128].reshape(-1, 128)


def held_out(model, lm, text) -> float:
    return perplexity(model, lm.tokenizer, "tinystories", ctx=256, max_windows=20, progress=False, text=text).nll


@pytest.mark.parametrize("scales", ["learned", "frozen"])
def test_short_qat_run_lowers_the_loss_of_the_pot_model(stories, story_halves, scales, tmp_path):
    """stories260K at PoT 3-bit: a 30-step QAT run recovers much of what post-training PoT lost."""
    text, pool = story_halves
    config = potq.QuantConfig("pot", 3, 32)
    ptq = copy.deepcopy(stories.model)
    potq.quantize_(ptq, config, method="grid", progress=False)
    float_loss, ptq_loss = held_out(stories.model, stories, text), held_out(ptq, stories, text)
    potq.quantize_(stories, config, method="qat", steps=30, lr=1e-3, scales=scales, calibration=pool,
                   progress=False)
    qat_loss = held_out(stories.model, stories, text)
    assert qat_loss < ptq_loss - 0.5 * (ptq_loss - float_loss)  # more than half the gap recovered
    meta = stories.model.potq_meta
    assert meta["method"] == "qat" and meta["method_settings"]["scales"] == scales
    potq.save(stories, tmp_path / "qat")
    loaded = potq.load(tmp_path / "qat")  # the same packed format as any post-training method
    ids = torch.tensor([stories.tokenizer.encode("Once upon a time")])
    assert torch.equal(loaded.model(ids).logits, stories.model(ids).logits)


def test_qat_on_the_char_model_trains_on_its_own_text(char_model, tmp_path):
    """With embeddings, the tables (and the tied head) are packed first and QAT trains around them."""
    potq.quantize_(char_model, potq.QuantConfig("pot", 3, 32), method="qat", steps=3, calib_samples=16,
                   calib_len=64, batch_size=2, embeddings=True, progress=False)
    assert char_model.model.potq_meta["calibration"]["data"] == "the train split of its own text"
    assert type(char_model.model.transformer.wte).__name__ == "QuantEmbedding"
    potq.save(char_model, tmp_path / "q")
    ids = torch.tensor([char_model.tokenizer.encode("ROMEO:", bos=False)])
    assert torch.equal(potq.load(tmp_path / "q").model(ids).logits, char_model.model(ids).logits)


def test_qat_cli_and_bad_input(char_trained, tmp_path, capsys):
    lm, _ = char_trained
    potq.save(lm, tmp_path / "char")
    out = tmp_path / "q"
    assert main(["qat", str(tmp_path / "char"), "--bits", "3", "--group-size", "32", "--steps", "4",
                 "--calib-samples", "16", "--batch-size", "2", "--report", str(tmp_path / "r.md"), "-o", str(out)]) == 0
    assert (out / "potq.json").is_file() and not (tmp_path / ".q.qat-ckpt").exists()
    assert "| step | train | val |" in (tmp_path / "r.md").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit):  # a usage error: one line from argparse
        main(["qat", str(tmp_path / "char"), "--scales", "wild", "-o", str(out)])
    assert main(["qat", str(tmp_path / "char"), "--calib-samples", "1", "--steps", "2", "-o", str(out)]) == 2
    assert "already holds a potq model: pass --overwrite" in capsys.readouterr().err
    assert main(["qat", str(tmp_path / "char"), "--calib-samples", "1", "--steps", "2", "-o", str(out),
                 "--overwrite"]) == 2
    assert "at least 2 training windows" in capsys.readouterr().err
