"""quantize_ -> save -> load on the real stories260K model: layers, numbers, files, errors."""

import json

import pytest
import torch

import potq
from potq.errors import PotqError
from potq.eval import perplexity
from potq.formats import get_format
from potq.formats.weights import fake_quantize, init_qparams
from potq.info import summary
from potq.nn import QuantLinear
from potq.quantize import quantizable_layers

PROMPT_IDS = torch.tensor([[1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298]])


def logits(lm: potq.LoadedModel) -> torch.Tensor:
    with torch.inference_mode():
        return lm.model(PROMPT_IDS).logits


def test_quantize_replaces_every_block_linear(stories):
    names = list(quantizable_layers(stories.model))
    assert len(names) == 5 * 7  # q k v o gate up down in each of 5 blocks
    originals = {n: m.weight.detach().clone() for n, m in quantizable_layers(stories.model).items()}
    potq.quantize_(stories.model, potq.PoTConfig(bits=4, group_size=32))
    fmt = get_format("pot", 4)
    for name, w in originals.items():
        layer = stories.model.get_submodule(name)
        assert isinstance(layer, QuantLinear)
        qp = fmt.as_stored(init_qparams(w, fmt, 32))
        assert torch.equal(layer.dequantize(), fake_quantize(w, fmt, 32, qp))
    assert isinstance(stories.model.lm_head, torch.nn.Linear)  # the head stays float


def test_save_load_gives_bit_identical_logits(stories, tmp_path):
    potq.quantize_(stories.model, potq.UniformConfig(bits=3, group_size=128))  # 172 = 128 + 44: ragged
    before = logits(stories)
    folder = potq.save(stories, tmp_path / "m")
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "model.safetensors", "potq.json", "tokenizer.json", "tokenizer_config.json",
        "tokenizer_specials.json"]
    loaded = potq.load(folder)
    assert torch.equal(logits(loaded), before)
    assert loaded.tokenizer.encode("Once upon a time") == stories.tokenizer.encode("Once upon a time")
    manifest = json.loads((folder / "potq.json").read_text())
    assert (manifest["format"], manifest["bits"], manifest["group_size"], manifest["method"]) == (
        "uniform", 3, 128, "rtn")
    assert manifest["source"]["sha256"] == stories.source["sha256"]
    assert len(manifest["source"]["sha256"]) == 64


def test_an_apot_model_saves_loads_and_runs_natively(stories, tmp_path):
    """Additive PoT: packed, reloaded to the same logits, and decoded by the native runtime's
    8-bit-activation kernels (its magnitudes as their byte table) within their rounding."""
    from potq.models.native_decoder import NativeDecoder

    potq.quantize_(stories.model, potq.QuantConfig("apot", 4, 64))
    before = logits(stories)
    loaded = potq.load(potq.save(stories, tmp_path / "m"))
    assert torch.equal(logits(loaded), before)
    assert json.loads((tmp_path / "m" / "potq.json").read_text())["format"] == "apot"
    if potq.kernels.fused.extension() is not None:
        ids = torch.tensor([stories.tokenizer.encode("Once upon a time there was")])
        native = NativeDecoder(loaded.model, ids.shape[1])(ids)
        with torch.inference_mode():
            reference = loaded.model(ids).logits[0, -1]
        assert (native - reference).abs().max() < 0.03 * reference.abs().max()


def test_float_model_round_trips_too(stories, tmp_path):
    folder = potq.save(stories, tmp_path / "f")
    assert torch.equal(logits(potq.load(folder)), logits(stories))


def test_bits_per_weight_counts_codes_and_scales(stories, tmp_path):
    potq.quantize_(stories.model, potq.PoTConfig(bits=3, group_size=32))
    s = summary(potq.save(stories, tmp_path / "m"))
    layers = [m for m in stories.model.modules() if isinstance(m, QuantLinear)]
    weights = sum(m.in_features * m.out_features for m in layers)
    assert s["quantized_weights"] == weights
    assert s["bits_per_quantized_weight"] == pytest.approx(8 * sum(m.storage_bytes() for m in layers) / weights)
    # rows of 64 and 172 weights: 3 bits + an fp16 scale per 32 (172 -> 6 groups, 65 bytes a row)
    assert 3.5 < s["bits_per_quantized_weight"] < 3.7


def test_perplexity_orders_float_8bit_3bit(stories_float, story_text):
    def ppl(lm):
        return perplexity(lm.model, lm.tokenizer, "tinystories", ctx=256, dtype="fp32",
                          progress=False, text=story_text).ppl

    import copy

    results = {"float": ppl(stories_float)}
    for name, config in [("uniform8", potq.UniformConfig(8, 32)), ("uniform3", potq.UniformConfig(3, 32)),
                         ("pot3", potq.PoTConfig(3, 32))]:
        lm = potq.LoadedModel(copy.deepcopy(stories_float.model), stories_float.tokenizer, {})
        potq.quantize_(lm.model, config)
        results[name] = ppl(lm)
    assert all(torch.isfinite(torch.tensor(v)) for v in results.values())
    assert results["float"] <= results["uniform8"] * 1.005, results  # 8 bits is lossless to 0.5 %
    assert results["uniform8"] < results["uniform3"], results
    assert results["uniform8"] < results["pot3"], results


def test_quantizing_twice_is_refused(stories):
    potq.quantize_(stories.model, potq.PoTConfig(bits=4))
    with pytest.raises(PotqError, match="already quantized"):
        potq.quantize_(stories.model, potq.PoTConfig(bits=4))


def test_interrupted_save_leaves_nothing(stories, tmp_path, monkeypatch):
    import potq.storage as storage

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(storage.Tokenizer, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        potq.save(stories, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_or_foreign_folders_give_one_line_errors(stories, tmp_path):
    potq.quantize_(stories.model, potq.PoTConfig(bits=3, group_size=32))
    folder = potq.save(stories, tmp_path / "m")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()

    weights.write_bytes(data[: len(data) // 2])  # truncated file
    with pytest.raises(PotqError, match="corrupt") as e:
        potq.load(folder)
    assert "\n" not in str(e.value)

    weights.write_bytes(data)
    manifest = json.loads((folder / "potq.json").read_text())
    manifest["quantized_layers"]["model.layers.0.mlp.down_proj"]["bits"] = 4  # codes no longer fit
    (folder / "potq.json").write_text(json.dumps(manifest))
    with pytest.raises(PotqError, match="digest mismatch"):
        potq.load(folder)

    (folder / "potq.json").write_text("{not json")
    with pytest.raises(PotqError, match="corrupt"):
        potq.load(folder)
    with pytest.raises(PotqError, match="not a potq model folder"):
        potq.load(tmp_path)
    (tmp_path / "other").mkdir()
    with pytest.raises(PotqError, match="not a potq model folder"):
        potq.save(stories, tmp_path / "other")


def test_gpt2_folder_quantizes_saves_and_loads(stories_float, tmp_path):
    """GPT-2 keeps its linears as Conv1D ([in, out]); potq sees nn.Linear like for LLaMA."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    original = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                          bos_token_id=1, eos_token_id=2)).eval()
    original.save_pretrained(tmp_path / "gpt2")
    stories_float.tokenizer.backend.save(str(tmp_path / "gpt2" / "tokenizer.json"))
    lm = potq.load_model(str(tmp_path / "gpt2"))
    with torch.inference_mode():
        assert torch.allclose(lm.model(PROMPT_IDS).logits, original(PROMPT_IDS).logits, atol=1e-5)
    potq.quantize_(lm, potq.PoTConfig(bits=4, group_size=32))
    assert len([m for m in lm.model.modules() if isinstance(m, QuantLinear)]) == 2 * 4  # c_attn c_proj c_fc c_proj
    loaded = potq.load(potq.save(lm, tmp_path / "q"))
    assert torch.equal(logits(loaded), logits(lm))


def test_stacked_projections_share_storage_and_still_save(stories, tmp_path):
    """Stacking q/k/v (what potq's decoder does) computes their outputs side by side, leaves the
    layers as views of the stacked matrix — nothing held twice — and the model saves and loads
    with the same logits."""
    from potq.nn.stacked import stack_rows

    potq.quantize_(stories.model, potq.QuantConfig("pot", 3, 32), method="rtn", progress=False)
    attn = stories.model.model.layers[0].self_attn
    layers = [attn.q_proj, attn.k_proj, attn.v_proj]
    x = torch.randn(3, attn.q_proj.in_features)
    with torch.no_grad():
        separate = [layer(x) for layer in layers]
        before = logits(stories)
        stacked = stack_rows(layers)
        assert torch.allclose(stacked(x), torch.cat(separate, dim=-1), atol=1e-6)
        assert all(torch.equal(layer(x), y) for layer, y in zip(layers, separate))
    for layer in layers:
        assert layer.codes.untyped_storage().data_ptr() == stacked.codes.untyped_storage().data_ptr()
    assert torch.equal(logits(potq.load(potq.save(stories, tmp_path / "m"))), before)


def test_layers_that_differ_are_not_stacked(stories):
    from potq.nn.stacked import stack_rows

    attn, mlp = stories.model.model.layers[0].self_attn, stories.model.model.layers[0].mlp
    assert stack_rows([attn.q_proj, attn.k_proj]) is None  # float layers are left alone
    potq.quantize_(stories.model, potq.QuantConfig("pot", 3, 32), method="rtn", progress=False)
    assert stack_rows([attn.q_proj, stories.model.lm_head]) is None  # packed next to float
    assert stack_rows([mlp.gate_proj, mlp.down_proj]) is None  # different input widths
