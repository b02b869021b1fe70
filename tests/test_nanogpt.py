"""The seed's char-level nanoGPT: training, resume, the short name, storage and the CLI."""

import torch
import pytest

import potq
from potq.cli import main
from potq.errors import PotqError
from potq.eval import perplexity
from potq.eval.data import shakespeare_text, training_batch
from potq.models.nanogpt import CharGPTShape, char_model, char_tokenizer
from potq.train.char import window_batches
from potq.train.loop import TrainSettings, train


def test_a_200_step_run_lowers_the_loss(char_trained):
    lm, result = char_trained
    first, last = result.history[0], result.history[-1]
    assert (first["step"], last["step"]) == (0, 200)
    assert first["val"] > 4.0  # ≈ ln 65: an untrained model guesses uniformly
    assert last["val"] < first["val"] - 1.0 and last["train"] < first["train"] - 1.0
    assert lm.source["training"]["settings"]["steps"] == 200 and lm.source["loader"] == "potq train-char"
    config = lm.model.config
    assert (config.n_layer, config.n_head, config.n_embd, config.n_positions, config.vocab_size) == (4, 4, 128, 64, 65)


def test_tokenizer_is_nanogpts_character_table():
    tok = char_tokenizer(shakespeare_text())
    assert tok.vocab_size == 65
    ids = tok.encode("First Citizen:\n", bos=False)
    assert ids[:5] == [18, 47, 56, 57, 58]  # nanoGPT's shakespeare_char ids (sorted characters)
    assert tok.decode(ids) == "First Citizen:\n"


def _tiny_run(steps, state_dir, interrupt_at=None):
    torch.manual_seed(0)
    model = char_model(65, CharGPTShape(n_layer=1, n_head=2, n_embd=16, block_size=16))
    ids = torch.randint(0, 65, (3000,))
    batches = window_batches({"train": ids[:2000], "val": ids[2000:]}, 4, 16)

    def batch(split, rng):
        if interrupt_at is not None and split == "train" and rng.initial_seed() == interrupt_at:
            raise KeyboardInterrupt
        return batches(split, rng)

    settings = TrainSettings(steps=steps, warmup=2, eval_every=5, eval_batches=2)
    result = train(model, batch, settings, state_dir=state_dir, progress=False, checkpoint_seconds=0.0)
    return model, result


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path):
    straight, _ = _tiny_run(12, tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        _tiny_run(12, tmp_path / "b", interrupt_at=7)
    resumed, result = _tiny_run(12, tmp_path / "b")
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert [h["step"] for h in result.history] == [0, 5, 10, 12]
    with pytest.raises(PotqError, match="other settings"):
        train(resumed, lambda s, r: None, TrainSettings(steps=99), state_dir=tmp_path / "b", progress=False)


def test_short_name_needs_training_first(tmp_path, monkeypatch, char_trained):
    monkeypatch.setenv("POTQ_HOME", str(tmp_path))
    with pytest.raises(PotqError, match="run `potq train-char` first"):
        potq.load_model("nanogpt-shakespeare")
    lm, _ = char_trained
    potq.save(lm, tmp_path / "models" / "nanogpt-shakespeare")
    loaded = potq.load_model("nanogpt-shakespeare")
    ids = torch.tensor([lm.tokenizer.encode("ROMEO:\nWhat", bos=False)])
    assert torch.equal(loaded.model(ids).logits, lm.model(ids).logits)


def test_held_out_loss_and_calibration_text_never_overlap(char_trained):
    lm, result = char_trained
    r = perplexity(lm.model, lm.tokenizer, "shakespeare", ctx=64, max_windows=40, progress=False)
    assert r.nll == pytest.approx(result.final["val"], abs=0.25)  # the test split scores like val
    batch = training_batch(lm.tokenizer, lm.source, 4, 64, seed=0)
    test = potq.eval.eval_text("shakespeare")
    assert batch.shape == (4, 64) and all(lm.tokenizer.decode(row.tolist()) not in test for row in batch)


def test_quantized_embeddings_and_tied_head_round_trip(char_model, tmp_path):
    model = char_model.model
    ids = torch.tensor([char_model.tokenizer.encode("KING HENRY:\nNo", bos=False)])
    potq.quantize_(char_model, potq.QuantConfig("pot-seed", 5, -1), embeddings=True, progress=False)
    tables = {n: type(m).__name__ for n, m in model.named_modules() if n in ("transformer.wte", "transformer.wpe", "lm_head")}
    assert tables == {"transformer.wte": "QuantEmbedding", "transformer.wpe": "QuantEmbedding", "lm_head": "QuantLinear"}
    assert model.lm_head.codes is model.transformer.wte.codes  # still tied
    before = model(ids).logits
    potq.save(char_model, tmp_path / "q")
    loaded = potq.load(tmp_path / "q")
    assert loaded.model.lm_head.codes is loaded.model.transformer.wte.codes
    assert torch.equal(loaded.model(ids).logits, before)
    from potq.info import summary

    s = summary(tmp_path / "q")
    assert s["quantized_embedding_tables"] == 2 and 5 < s["bits_per_embedding_weight"] < 5.3


def test_train_char_cli_errors(tmp_path, capsys):
    assert main(["train-char", "--data", str(tmp_path / "none.txt"), "-o", str(tmp_path / "o")]) == 2
    assert "no such text file" in capsys.readouterr().err
    (tmp_path / "short.txt").write_text("abc" * 10)
    assert main(["train-char", "--data", str(tmp_path / "short.txt"), "-o", str(tmp_path / "o"), "--steps", "2"]) == 2
    assert "fewer than the context" in capsys.readouterr().err


def test_keep_best_ends_with_the_lowest_validation_estimate():
    """A rate far too high makes training diverge; keep_best ends with the best estimate's weights."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16))
    data = torch.randint(0, 16, (64, 9))

    def batch(split, rng):
        rows = data[torch.randint(0, 32, (4,), generator=rng) + (0 if split == "train" else 32)]
        return rows[:, :-1], rows[:, 1:]

    settings = TrainSettings(steps=30, lr=30.0, warmup=1, eval_every=5, eval_batches=2, keep_best=True,
                             grad_clip=0.0)
    result = train(model, batch, settings, progress=False)
    best = min(result.history, key=lambda h: h["val"])
    assert result.kept_step == best["step"] and best["val"] < result.history[-1]["val"]
    from potq.train.loop import estimate_loss
    assert abs(estimate_loss(model, batch, settings)["val"] - best["val"]) < 1e-5
