"""Loaders: GGUF, llama2.c and Hugging Face folders give working float32 transformers models.

The stories260K model exists both as a llama2.c ``.bin`` and as a GGUF; a small numpy forward
pass written here from llama2.c's ``run.c`` (adjacent-pair RoPE on the file's own weights) is
the independent reference that proves the q/k row reordering is right.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from potq.errors import PotqError
from potq.models import SHORT_NAMES, LoadedModel, architecture, build_model, load_model, transformer_blocks
from potq.paths import shared_file

STORIES_BIN = "models/stories260K/stories260K.bin"
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def stories() -> LoadedModel:
    return load_model("stories260k")


@pytest.fixture(scope="module")
def stories_bin() -> LoadedModel:
    return load_model(str(shared_file(STORIES_BIN)))


@pytest.fixture(scope="module")
def smollm() -> LoadedModel:
    return load_model("smollm2-135m")


def logits(loaded: LoadedModel, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(torch.tensor([ids])).logits[0]


def perplexity(loaded: LoadedModel, ids: list[int], window: int) -> float:
    """exp(mean next-token cross-entropy) over non-overlapping windows of ``ids``."""
    losses = []
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window + 1]
        out = logits(loaded, chunk[:-1])
        losses.append(torch.nn.functional.cross_entropy(out, torch.tensor(chunk[1:]), reduction="none"))
    return math.exp(torch.cat(losses).mean().item())


def reference_logits(path: Path, ids: list[int]) -> np.ndarray:
    """llama2.c's forward pass (run.c) in float64 numpy, straight from the .bin file."""
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = np.fromfile(path, np.int32, 7)
    floats = np.fromfile(path, np.float32, offset=28).astype(np.float64)
    head = dim // heads
    shapes = [("emb", (vocab, dim)), ("rms_att", (layers, dim)), ("wq", (layers, dim, dim)),
              ("wk", (layers, kv_heads * head, dim)), ("wv", (layers, kv_heads * head, dim)),
              ("wo", (layers, dim, dim)), ("rms_ffn", (layers, dim)), ("w1", (layers, hidden, dim)),
              ("w2", (layers, dim, hidden)), ("w3", (layers, hidden, dim)), ("rms_final", (dim,)),
              ("cos", (seq_len, head // 2)), ("sin", (seq_len, head // 2))]
    w, offset = {}, 0
    for name, shape in shapes:
        w[name] = floats[offset:offset + int(np.prod(shape))].reshape(shape)
        offset += int(np.prod(shape))
    steps = len(ids)
    rotation = (w["cos"] + 1j * w["sin"])[:steps, None, :]  # the file's own RoPE table

    def rmsnorm(x, weight):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * weight

    def rope(x, n):  # rotate adjacent pairs (x0, x1), (x2, x3) ... as complex numbers
        pairs = x.reshape(steps, n, head // 2, 2)
        turned = (pairs[..., 0] + 1j * pairs[..., 1]) * rotation
        return np.stack([turned.real, turned.imag], -1).reshape(steps, n, head)

    x = w["emb"][ids]
    causal = np.triu(np.full((steps, steps), -np.inf), 1)
    for layer in range(layers):
        h = rmsnorm(x, w["rms_att"][layer])
        q, k = rope(h @ w["wq"][layer].T, heads), rope(h @ w["wk"][layer].T, kv_heads)
        v = (h @ w["wv"][layer].T).reshape(steps, kv_heads, head)
        out = np.empty((steps, heads, head))
        for i in range(heads):
            g = i // (heads // kv_heads)
            scores = q[:, i] @ k[:, g].T / np.sqrt(head) + causal
            att = np.exp(scores - scores.max(-1, keepdims=True))
            out[:, i] = (att / att.sum(-1, keepdims=True)) @ v[:, g]
        x = x + out.reshape(steps, dim) @ w["wo"][layer].T
        h = rmsnorm(x, w["rms_ffn"][layer])
        gate = h @ w["w1"][layer].T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ w["w3"][layer].T)) @ w["w2"][layer].T
    return rmsnorm(x, w["rms_final"]) @ w["emb"].T  # stories260K shares the classifier


def test_stories_gguf_and_llama2c_agree(stories: LoadedModel, stories_bin: LoadedModel) -> None:
    ids = stories.tokenizer.encode(PROMPT + ", there was a little dog")
    assert torch.allclose(logits(stories, ids), logits(stories_bin, ids), atol=1e-4)
    assert stories.source["loader"] == "gguf" and stories_bin.source["loader"] == "llama2c"
    assert stories.source["name"] == "stories260k" and stories_bin.source["name"] is None
    assert len(stories.source["sha256"]) == 64
    json.dumps(stories.source)


def test_logits_match_independent_llama2c_forward(stories: LoadedModel, stories_bin: LoadedModel) -> None:
    ids = stories.tokenizer.encode(PROMPT + ", there was a little dog named Max.")
    expected = torch.from_numpy(reference_logits(shared_file(STORIES_BIN), ids)).float()
    assert torch.allclose(logits(stories_bin, ids), expected, atol=1e-4)
    assert torch.allclose(logits(stories, ids), expected, atol=1e-4)


def test_stories_config(stories: LoadedModel, stories_bin: LoadedModel) -> None:
    for loaded in (stories, stories_bin):
        config = loaded.model.config
        shape = (config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                 config.num_attention_heads, config.num_key_value_heads, config.vocab_size)
        assert shape == (64, 172, 5, 8, 4, 512)
        assert loaded.model.dtype == torch.float32 and not loaded.model.training
    assert stories_bin.model.config.tie_word_embeddings  # llama2.c shares; the GGUF stores a copy
    assert not stories.model.config.tie_word_embeddings


def test_stories_tokenizers_agree(stories: LoadedModel, stories_bin: LoadedModel) -> None:
    ids = stories.tokenizer.encode(PROMPT)
    assert ids == stories_bin.tokenizer.encode(PROMPT) and ids[0] == 1 and len(ids) == 5
    for text in ("Once upon a time, there was a little girl.", "The cat sat on the mat!", "Tom said: \"Hi, Sue.\""):
        assert stories.tokenizer.decode(stories.tokenizer.encode(text)) == text
        assert stories_bin.tokenizer.encode(text) == stories.tokenizer.encode(text)
    assert (stories.tokenizer.bos_id, stories.tokenizer.eos_id) == (1, 2)


def test_stories_writes_english(stories: LoadedModel) -> None:
    ids = stories.tokenizer.encode(PROMPT)
    for _ in range(12):
        ids.append(int(logits(stories, ids)[-1].argmax()))
    text = stories.tokenizer.decode(ids)
    assert text.startswith(PROMPT) and len(text.split()) >= 6
    assert all(word.strip(",.!").isalpha() for word in text.split())


def test_stories_perplexity(stories: LoadedModel) -> None:
    text = shared_file("data/tinystories_valid_head.txt").read_text()[:2000]
    ppl = perplexity(stories, stories.tokenizer.encode(text), window=256)
    print(f"stories260K perplexity on 2000 chars of TinyStories: {ppl:.2f}")
    assert ppl < 50


def test_smollm2(smollm: LoadedModel) -> None:
    model = smollm.model
    assert len(transformer_blocks(model)) == 30
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.rope_parameters["rope_theta"] == 100000.0
    text = shared_file("data/wikitext2_wiki.test.raw").read_text()[:4000]
    ids = smollm.tokenizer.encode(text)[:300]
    assert not smollm.tokenizer.add_bos
    ppl = perplexity(smollm, ids, window=300)
    print(f"SmolLM2-135M (Q4_1-expanded) perplexity on 300 WikiText-2 tokens: {ppl:.2f}")
    assert ppl < 40
    sentence = " Robert Boulter is an English film , television and theatre actor . He had a guest @-@ starring role"
    assert smollm.tokenizer.decode(smollm.tokenizer.encode(sentence)) == sentence
    # SmolLM2 splits every number character off first (llama.cpp's "smollm" pre-tokenizer, HF's Digits).
    assert smollm.tokenizer.backend.encode(" 4 \u00bd months").tokens == ["Ġ", "4", "Ġ", "Â½", "Ġmonths"]


def test_rebuild_from_architecture(stories: LoadedModel) -> None:
    arch = json.loads(json.dumps(architecture(stories.model)))
    rebuilt = build_model(arch)
    rebuilt.load_state_dict(stories.model.state_dict())
    ids = stories.tokenizer.encode(PROMPT)
    assert not rebuilt.training and type(rebuilt) is type(stories.model)
    assert torch.equal(rebuilt(torch.tensor([ids])).logits[0], logits(stories, ids))


def save_hf_folder(model: torch.nn.Module, folder: Path, tokenizer_source: LoadedModel) -> Path:
    model.save_pretrained(folder)
    tokenizer_source.tokenizer.backend.save(str(folder / "tokenizer.json"))
    return folder


@pytest.mark.parametrize("make", [
    lambda: LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)),
    lambda: GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                       bos_token_id=1, eos_token_id=2)),
], ids=["llama", "gpt2"])
def test_hf_folder(make, tmp_path: Path, stories: LoadedModel) -> None:
    torch.manual_seed(0)
    original = make().eval()
    loaded = load_model(str(save_hf_folder(original, tmp_path / "m", stories)))
    ids = loaded.tokenizer.encode(PROMPT)
    with torch.no_grad():
        # GPT-2's Conv1D becomes nn.Linear (same math, another summation order): equal to float tolerance
        assert torch.allclose(loaded.model(torch.tensor([ids])).logits, original(torch.tensor([ids])).logits,
                              atol=1e-5)
    assert loaded.source["loader"] == "hf" and type(loaded.model) is type(original)
    assert len(transformer_blocks(loaded.model)) == 2
    assert loaded.tokenizer.decode(ids) == PROMPT and (loaded.tokenizer.bos_id, loaded.tokenizer.eos_id) == (1, 2)
    rebuilt = build_model(json.loads(json.dumps(architecture(loaded.model))))
    rebuilt.load_state_dict(loaded.model.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(torch.tensor([ids])).logits, loaded.model(torch.tensor([ids])).logits)


def test_short_names() -> None:
    assert set(SHORT_NAMES) >= {"smollm2-135m", "stories260k"}
    for relative in SHORT_NAMES.values():
        assert shared_file(relative).is_file()


def expect_error(spec: str, *words: str) -> None:
    with pytest.raises(PotqError) as caught:
        load_model(spec)
    message = str(caught.value)
    assert "\n" not in message and all(word in message for word in words), message


def test_bad_inputs(tmp_path: Path, stories: LoadedModel) -> None:
    expect_error(str(tmp_path / "nope.gguf"), "no such file", "stories260k")
    (tmp_path / "x.gguf").write_text("not a model\n")
    expect_error(str(tmp_path / "x.gguf"), "not a readable GGUF")
    (tmp_path / "empty.gguf").write_bytes(b"")
    expect_error(str(tmp_path / "empty.gguf"), "not a readable GGUF")
    gguf = shared_file(SHORT_NAMES["stories260k"]).read_bytes()
    (tmp_path / "cut.gguf").write_bytes(gguf[: len(gguf) // 2])
    expect_error(str(tmp_path / "cut.gguf"), "GGUF")
    (tmp_path / "notes.txt").write_text("hello")
    expect_error(str(tmp_path / "notes.txt"), "unknown model file type")
    (tmp_path / "folder").mkdir()
    expect_error(str(tmp_path / "folder"), "config.json")


def test_a_fetched_name_not_fetched_yet_says_how_to_fetch_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("POTQ_HOME", str(tmp_path))
    expect_error("gemma3-270m", "not fetched yet", "benchmarks/gemma3.py --fetch-only")


def write_gguf(path: Path, architecture_name: str, kind: str = "Q8_1") -> None:
    """A minimal LLaMA-shaped GGUF whose only tensor (2 rows of 256) is stored as ``kind``: Q8_1
    (llama.cpp's activation type) is one potq does not expand, Q4_K one it does."""
    writer = gguf.GGUFWriter(str(path), architecture_name)
    writer.add_block_count(1)
    writer.add_embedding_length(256)
    writer.add_feed_forward_length(256)
    writer.add_head_count(4)
    writer.add_token_list(["a", "b"])
    block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    writer.add_tensor("token_embd.weight", np.zeros((2, 256 // block * nbytes), np.uint8),
                      raw_dtype=gguf.GGMLQuantizationType[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_unsupported_gguf(tmp_path: Path) -> None:
    write_gguf(tmp_path / "gpt2.gguf", "gpt2")
    expect_error(str(tmp_path / "gpt2.gguf"), "'gpt2'", "llama")
    write_gguf(tmp_path / "k.gguf", "llama")
    expect_error(str(tmp_path / "k.gguf"), "Q8_1", "IQ4_NL", "Q3_K")
    write_gguf(tmp_path / "k4.gguf", "llama", "Q4_K")  # llama.cpp's k-quants expand: only the blocks are missing
    expect_error(str(tmp_path / "k4.gguf"), "lacks", "model.layers.0")


def test_bad_llama2c(tmp_path: Path) -> None:
    source = shared_file(STORIES_BIN)
    data = source.read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[:-1000])
    shutil.copy(source.with_name("tok512.bin"), tmp_path)
    expect_error(str(tmp_path / "cut.bin"), "truncated")
    (tmp_path / "tiny.bin").write_bytes(b"\x01\x02")
    expect_error(str(tmp_path / "tiny.bin"), "too short")
    (tmp_path / "alone").mkdir()
    shutil.copy(source, tmp_path / "alone")
    expect_error(str(tmp_path / "alone" / source.name), "tok512.bin")


def test_bad_hf_folders(tmp_path: Path, stories: LoadedModel) -> None:
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    expect_error(str(bert), "'bert'", "LlamaForCausalLM")
    config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=64)
    folder = save_hf_folder(LlamaForCausalLM(config), tmp_path / "llama", stories)
    (folder / "tokenizer.json").unlink()
    expect_error(str(folder), "tokenizer.json")
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.0.mlp.up_proj.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    expect_error(str(folder), "lacks", "up_proj")
    (folder / "model.safetensors").write_bytes(b"garbage")
    expect_error(str(folder), "re-save")


def test_unknown_models_and_architectures() -> None:
    for call in (lambda: transformer_blocks(torch.nn.Linear(2, 2)), lambda: architecture(torch.nn.Linear(2, 2)),
                 lambda: build_model({"family": "hf", "config": {"model_type": "bert"}}),
                 lambda: build_model({"family": "torch"})):
        with pytest.raises(PotqError) as caught:
            call()
        assert "\n" not in str(caught.value)
