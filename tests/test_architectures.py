"""Every decoder class potq supports, as a tiny random model built with transformers' own classes
(tests/zoo.py): loaded from a Hugging Face folder, quantized by every method, saved, reloaded
with the same logits, and generating; AWQ's folds found from the modules keep each block's
function; MoE experts are quantized one by one; unknown classes are refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

import potq
from potq.engine.blocks import capture_inputs, outputs, run_blockwise
from potq.errors import PotqError
from potq.models import transformer_blocks
from potq.models.arch import ARCHITECTURES, fold_groups
from tests.zoo import CONFIGS, tiny_folder, tiny_model

IDS = torch.tensor([[1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298]])
METHODS = {"rtn": {}, "grid": {}, "gptq": {}, "awq": {}, "twostep": {"epochs": 1}, "finetune": {"epochs": 1},
           "omniquant": {"epochs": 1}, "qat": {"steps": 2, "batch_size": 2},
           "awq,blockap,e2e": {"epochs": 1, "e2e_steps": 1}}


def test_the_zoo_covers_every_supported_architecture():
    assert set(CONFIGS) == set(ARCHITECTURES)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_the_engine_walks_the_blocks_as_the_model_does(kind):
    """Block by block, each with its own mask and rotary tables, the engine's activations are the
    model's own hidden states — Gemma's sliding-window layers and its global ones are handed
    different ones (a window shorter than the text; Gemma 3's two rotary bases)."""
    layers = {"num_hidden_layers": 3}
    if kind in ("gemma2", "gemma3_text"):
        layers["layer_types"] = ["sliding_attention", "full_attention", "sliding_attention"]
    elif getattr(CONFIGS[kind](), "layer_types", None):
        layers["layer_types"] = ["full_attention"] * 3
    model = tiny_model(kind, **layers)
    ids = torch.randint(3, 500, (4, 160), generator=torch.Generator().manual_seed(0))  # past the window of 128
    seen = []
    run_blockwise(model, ids, lambda _i, _block, data, _targets: seen.append(torch.cat(data.inputs)), batch_size=2,
                  targets=False, progress=False)
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    assert len(seen) == 3
    for i, x in enumerate(seen):
        torch.testing.assert_close(x, hidden[i], rtol=1e-4, atol=1e-4, msg=f"{kind}: block {i}'s inputs")


@pytest.fixture(scope="module")
def folders(stories_float, tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    return {kind: tiny_folder(kind, root / kind, stories_float.tokenizer) for kind in CONFIGS}


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_every_method_quantizes_saves_and_reloads(kind, folders, tmp_path):
    reference = potq.load_model(str(folders[kind]))
    with torch.inference_mode():
        float_logits = reference.model(IDS).logits
    for method, settings in METHODS.items():
        lm = potq.load_model(str(folders[kind]))
        calibration = {} if method in ("rtn", "grid") else {"calib_samples": 4, "calib_len": 32, "seed": 0}
        potq.quantize_(lm, potq.PoTConfig(3, 32), method=method, progress=False, **calibration, **settings)
        with torch.inference_mode():
            logits = lm.model(IDS).logits
        assert not torch.equal(logits, float_logits), method  # the weights really changed
        loaded = potq.load(potq.save(lm, tmp_path / method))
        with torch.inference_mode():
            assert torch.equal(loaded.model(IDS).logits, logits), (kind, method)
        assert json.loads((tmp_path / method / "potq.json").read_text())["architecture"]["config"]["model_type"] == kind
    text = potq.eval.generate(loaded.model, loaded.tokenizer, "Once upon a time", max_new_tokens=4)
    assert isinstance(text, str)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_found_folds_keep_the_block_function(kind):
    model = tiny_model(kind)
    if kind == "gpt2":
        from potq.models.hf import as_linear_layers

        as_linear_layers(model)
    data = capture_inputs(model, torch.randint(3, 500, (2, 32)), 2)
    block = transformer_blocks(model)[1]
    before = outputs(block, data)
    folds = fold_groups(block, data.inputs[0], data.kwargs)
    assert folds, kind  # every family has at least its norms -> first projections
    for fold in folds:
        fold.apply(block, torch.linspace(0.5, 2.0, fold.previous.weight.shape[0]))
    for after, target in zip(outputs(block, data), before):
        torch.testing.assert_close(after, target, rtol=1e-3, atol=1e-4)


def test_unknown_classes_are_refused_in_one_line(stories_float, tmp_path):
    import transformers as T

    for config, words in ((T.BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                        intermediate_size=64), ("'bert'", "LlamaForCausalLM")),):
        folder = tmp_path / config.model_type
        folder.mkdir()
        (folder / "config.json").write_text(config.to_json_string())
        with pytest.raises(PotqError) as caught:
            potq.load_model(str(folder))
        assert "\n" not in str(caught.value) and all(w in str(caught.value) for w in words), str(caught.value)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gemma2", "phi3"])
def test_transformers_opens_a_packed_folder_after_import_potq(kind, folders, tmp_path):
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    lm = potq.load_model(str(folders[kind]))
    potq.quantize_(lm, potq.PoTConfig(3, 32), progress=False)
    folder = potq.save(lm, tmp_path / "packed")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "potq" and config["quantization_config"]["quant_method"] == "potq"
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert not any(isinstance(m, torch.nn.Linear) for m in transformer_blocks(model).modules())  # packed, no float copy
    with torch.inference_mode():
        assert torch.equal(model(IDS).logits, potq.load(folder).model(IDS).logits)
        assert model.generate(IDS, max_new_tokens=3, do_sample=False).shape == (1, IDS.shape[1] + 3)
    without = subprocess.run([sys.executable, "-c", "from transformers import AutoModelForCausalLM; "
                              f"AutoModelForCausalLM.from_pretrained({str(folder)!r})"], capture_output=True, text=True)
    assert without.returncode != 0 and "model type `potq`" in without.stderr  # refused, never random weights


def test_a_bf16_model_stays_bf16_and_the_packed_folder_is_smaller(stories_float, tmp_path):
    from safetensors import safe_open

    tiny_model("qwen2").to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    stories_float.tokenizer.backend.save(str(tmp_path / "hf" / "tokenizer.json"))
    lm = potq.load_model(str(tmp_path / "hf"))
    potq.quantize_(lm, potq.PoTConfig(3, 32), progress=False)
    with torch.inference_mode():
        logits = lm.model(IDS).logits
    folder = potq.save(lm, tmp_path / "packed")
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
    source = sum(p.stat().st_size for p in (tmp_path / "hf").glob("*.safetensors"))
    assert (folder / "model.safetensors").stat().st_size < source
    with torch.inference_mode():
        assert torch.equal(potq.load(folder).model(IDS).logits, logits)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gemma3_text", "opt"])
@pytest.mark.parametrize("method", ["rtn", "grid"])
def test_a_streamed_quantization_equals_the_in_memory_one(kind, method, folders, tmp_path):
    from safetensors import safe_open

    from potq.cli import main

    lm = potq.load_model(str(folders[kind]))
    potq.quantize_(lm, potq.PoTConfig(3, 32), method=method, progress=False)
    memory = potq.save(lm, tmp_path / "memory")
    assert main(["quantize", str(folders[kind]), "--format", "pot", "--bits", "3", "--group-size", "32",
                 "--method", method, "-o", str(tmp_path / "streamed"), "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["streamed"] is True
    manifests = [json.loads((f / "potq.json").read_text()) for f in (memory, tmp_path / "streamed")]
    for m in manifests:
        m.pop("created")
    assert manifests[0] == manifests[1]
    with safe_open(str(memory / "model.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "streamed" / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            assert a.get_tensor(key).dtype == b.get_tensor(key).dtype and torch.equal(a.get_tensor(key), b.get_tensor(key))
    potq.storage.verify(tmp_path / "streamed")


# gptq and awq on every class; twostep (the same engine path, slower) on a few
LAZY_RUNS = [(kind, method) for kind in sorted(CONFIGS) for method in ("gptq", "awq")] + \
    [(kind, "twostep") for kind in ("llama", "gpt2", "gemma2", "phi3")]


@pytest.mark.parametrize("kind, method", LAZY_RUNS)
def test_a_lazily_loaded_model_quantizes_to_the_same_tensors(kind, method, folders):
    """``load_model(lazy=True)``: the blocks stay in the files until the engine reads each in turn
    and are dropped after; the result is the in-memory one, tensor for tensor."""
    settings = {"calib_samples": 4, "calib_len": 32, "seed": 0, "progress": False,
                **({"epochs": 1} if method == "twostep" else {})}
    lazy = potq.load_model(str(folders[kind]), lazy=True)
    blocks = transformer_blocks(lazy.model)
    moe = kind in ("mixtral", "qwen3_moe")  # MoE checkpoints store experts apart: read whole by transformers
    assert all(p.is_meta != moe for p in blocks.parameters())
    head = lazy.model.get_output_embeddings()  # read at the end: quantizing never uses it
    assert not any(p.is_meta for name, p in lazy.model.named_parameters() if p is not head.weight and
                   not name.startswith(next(n for n, m in lazy.model.named_modules() if m is blocks)))
    whole = potq.load_model(str(folders[kind]))
    for lm in (lazy, whole):
        potq.quantize_(lm, potq.PoTConfig(3, 32), method=method, **settings)
    a, b = lazy.model.state_dict(), whole.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), (kind, method, key)
    if not moe:
        with pytest.raises(PotqError, match="whole model"):
            potq.quantize_(potq.load_model(str(folders[kind]), lazy=True), potq.PoTConfig(3, 32), method="rtn")


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_every_expert_is_quantized_and_the_router_stays_float(kind, folders):
    """The fused 3-D experts become a linear per expert that computes what transformers' module
    does; each is packed (its own codes), the router keeps its float weight."""
    from potq.models.experts import ExpertLinears
    from potq.nn import QuantLinear

    fused = tiny_model(kind)
    with torch.inference_mode():
        expected = fused(IDS).logits
    lm = potq.load_model(str(folders[kind]))
    with torch.inference_mode():
        torch.testing.assert_close(lm.model(IDS).logits, expected, rtol=0, atol=1e-6)
    moe = transformer_blocks(lm.model)[0].mlp
    assert isinstance(moe.experts, ExpertLinears) and len(moe.experts.experts) == 4
    potq.quantize_(lm, potq.PoTConfig(3, 32), method="gptq", calib_samples=4, calib_len=32, progress=False)
    packed = [m for m in moe.experts.modules() if isinstance(m, QuantLinear)]
    assert len(packed) == 8 and len({m.codes.data_ptr() for m in packed}) == 8
    assert isinstance(moe.gate.weight, torch.nn.Parameter) and moe.gate.weight.dtype == torch.float32


@pytest.mark.parametrize("method", ["gptq", "awq", "twostep", "grid"])
def test_an_expert_no_calibration_token_reaches_is_still_quantized(method, folders):
    """With the router forced away from expert 3, that expert gets no statistics: every method
    still quantizes it (GPTQ as rounding, AWQ without clipping) instead of failing or zeroing it."""
    from potq.nn import QuantLinear

    class NeverThree(torch.nn.Module):  # the router, with expert 3's picks sent to expert 0
        def __init__(self, router: torch.nn.Module) -> None:
            super().__init__()
            self.router = router

        def forward(self, hidden: torch.Tensor) -> tuple:
            logits, scores, index = self.router(hidden)
            return logits, scores, torch.where(index == 3, torch.zeros_like(index), index)

    lm = potq.load_model(str(folders["mixtral"]))
    for block in transformer_blocks(lm.model):
        block.mlp.gate = NeverThree(block.mlp.gate)
    settings = {"epochs": 1} if method == "twostep" else {"objective": "act"} if method == "grid" else {}
    potq.quantize_(lm, potq.PoTConfig(3, 32), method=method, calib_samples=4, calib_len=32, progress=False,
                   **settings)
    expert = transformer_blocks(lm.model)[0].mlp.experts.experts[3]
    assert isinstance(expert.down_proj, QuantLinear)
    assert expert.down_proj.dequantize().abs().sum() > 0


def test_a_large_model_is_saved_in_shards_with_an_index(folders, tmp_path):
    """Over the shard size, the packed weights go into numbered shards and an index, in memory and
    streamed alike; the folder loads, verifies and opens in transformers as one file would; a
    shard that is missing or from another save is refused in one line."""
    from safetensors import safe_open

    from potq import storage
    from potq.info import summary
    from potq.stream import stream_quantize

    lm = potq.load_model(str(folders["llama"]))
    potq.quantize_(lm, potq.PoTConfig(3, 32), progress=False)
    with torch.inference_mode():
        logits = lm.model(IDS).logits
    one = potq.save(lm, tmp_path / "one")
    sharded = potq.save(lm, tmp_path / "sharded", max_shard_bytes=100_000)
    streamed = stream_quantize(folders["llama"], potq.PoTConfig(3, 32), "rtn", {}, tmp_path / "streamed",
                               lm.source, progress=False, max_shard_bytes=100_000)
    for folder in (sharded, streamed):
        files = storage.weight_files(folder)
        assert len(files) > 1 and (folder / storage.INDEX_FILE).is_file() and not (folder / "model.safetensors").exists()
        index = json.loads((folder / storage.INDEX_FILE).read_text())["weight_map"]
        for file in files:
            with safe_open(str(file), "pt") as f:
                assert all(index[k] == file.name for k in f.keys())
        storage.verify(folder)
        with torch.inference_mode():
            assert torch.equal(potq.load(folder).model(IDS).logits, logits)
    assert summary(sharded)["file_bytes"] > 0.9 * summary(one)["file_bytes"]
    other = potq.load_model(str(folders["llama"]))
    potq.quantize_(other, potq.PoTConfig(3, 32), method="grid", progress=False)
    foreign = storage.weight_files(potq.save(other, tmp_path / "other", max_shard_bytes=100_000))
    files = storage.weight_files(sharded)
    files[1].write_bytes(foreign[1].read_bytes())
    with pytest.raises(PotqError, match="does not belong"):
        potq.load(sharded)
    files[1].unlink()
    with pytest.raises(PotqError, match="missing"):
        potq.load(sharded)


@pytest.mark.parametrize("kind", ["qwen2", "gemma3_text", "mixtral"])
def test_transformers_quantizes_while_loading_through_potqs_quantizer(kind, folders):
    """``from_pretrained(folder, quantization_config=PotqQuantization(...))``: transformers' own
    quantizer extension point; the result is potq's packed model, as ``potq.quantize_`` makes it."""
    import transformers as T

    from potq import interop
    from potq.nn import QuantLinear

    model = T.AutoModelForCausalLM.from_pretrained(
        folders[kind], quantization_config=interop.PotqQuantization(bits=3, group_size=32), dtype=torch.float32)
    reference = potq.load_model(str(folders[kind]))
    potq.quantize_(reference, potq.PoTConfig(3, 32), progress=False)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == \
        sum(isinstance(m, QuantLinear) for m in reference.model.modules()) > 0
    with torch.inference_mode():
        assert torch.equal(model(IDS).logits, reference.model(IDS).logits)
    with pytest.raises(PotqError, match="data-free"):
        T.AutoModelForCausalLM.from_pretrained(folders[kind], quantization_config=interop.PotqQuantization(
            bits=3, method="gptq"))
