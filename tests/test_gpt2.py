"""GPT-2 checkpoints: the local BPE (equal to tiktoken's), HF folders without a tokenizer, llm.c files.

No pretrained GPT-2 weights exist on these machines, so the tests write small random GPT-2 models
in each format themselves and check potq reads back exactly the same network.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import potq
from potq.errors import PotqError
from potq.eval import eval_text
from potq.models.gpt2_bpe import MERGES, VOCAB, gpt2_tokenizer
from potq.models.hf import as_linear_layers
from potq.paths import shared_file


def tiktoken_gpt2():
    """tiktoken's GPT-2 encoding, built from the two shared files only (never fetched)."""
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    ranks = data_gym_to_mergeable_bpe_ranks(str(shared_file(MERGES)), str(shared_file(VOCAB)))
    pattern = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    return tiktoken.Encoding("gpt2-local", pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


def test_bpe_encodes_like_tiktoken():
    ours, reference = gpt2_tokenizer(), tiktoken_gpt2()
    text = eval_text("wikitext2")[:30000] + " naïve café — 東京 🙂\n\n  spaces"
    ids = ours.encode(text)
    assert ids == reference.encode(text)
    assert ours.decode(ids) == text and ours.vocab_size == 50257


def small_gpt2(seed=0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=50257, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        bos_token_id=50256, eos_token_id=50256)
    return GPT2LMHeadModel(config).eval()


def test_hf_gpt2_folder_without_tokenizer_gets_the_shared_bpe(tmp_path):
    original = small_gpt2()
    original.save_pretrained(tmp_path / "gpt2")
    lm = potq.load_model(str(tmp_path / "gpt2"))
    ids = torch.tensor([lm.tokenizer.encode("Hello world, this is GPT-2.")])
    assert ids.tolist() == [tiktoken_gpt2().encode("Hello world, this is GPT-2.")]
    with torch.no_grad():
        assert torch.allclose(lm.model(ids).logits, original(ids).logits, atol=1e-5)


def write_llmc(model: GPT2LMHeadModel, path: Path, version: int, padded_vocab: int) -> None:
    """Write ``model`` the way llm.c's ``write_model`` does (header, then the 16 tensors)."""
    m = as_linear_layers(model)  # weights [out, in], as llm.c stores them
    c, layers = m.config.n_embd, m.config.n_layer
    header = np.zeros(256, dtype="<i4")
    header[:8] = [20240326, version, m.config.n_positions, m.config.vocab_size, layers, m.config.n_head, c, padded_vocab]
    wte = torch.zeros(padded_vocab, c)
    wte[:m.config.vocab_size] = m.transformer.wte.weight
    names = ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
             "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
             "mlp.c_proj.weight", "mlp.c_proj.bias"]
    state = m.state_dict()
    tensors = [wte, m.transformer.wpe.weight]
    tensors += [torch.stack([state[f"transformer.h.{i}.{n}"] for i in range(layers)]) for n in names]
    tensors += [m.transformer.ln_f.weight, m.transformer.ln_f.bias]
    with path.open("wb") as f:
        f.write(header.tobytes())
        for t in tensors:
            a = t.detach().float().contiguous().numpy()
            f.write(a.tobytes() if version == 3 else (a.view(np.uint32) >> 16).astype("<u2").tobytes())


@pytest.mark.parametrize("version", [3, 5])
def test_llmc_checkpoint(tmp_path, version):
    original = small_gpt2(seed=version)
    original.config.activation_function = "gelu_new"
    if version == 5:  # bf16 file: compare against the bf16-rounded weights
        with torch.no_grad():
            for p in original.parameters():
                p.copy_(p.to(torch.bfloat16).float())
    path = tmp_path / "gpt2_small.bin"
    write_llmc(original, path, version, padded_vocab=50304)
    lm = potq.load_model(str(path))
    assert lm.source["loader"] == "llmc" and lm.model.config.vocab_size == 50257
    ids = torch.tensor([lm.tokenizer.encode("The quick brown fox")])
    with torch.no_grad():
        assert torch.allclose(lm.model(ids).logits, original(ids).logits, atol=1e-4)
    potq.quantize_(lm, potq.PoTConfig(bits=4, group_size=32), progress=False)  # and it quantizes like any GPT-2
    assert torch.isfinite(lm.model(ids).logits).all()


def test_llmc_bad_files(tmp_path):
    path = tmp_path / "bad.bin"
    write_llmc(small_gpt2(), path, 3, padded_vocab=50304)
    raw = path.read_bytes()
    path.write_bytes(raw[:-100])
    with pytest.raises(PotqError, match="truncated or corrupt"):
        potq.load_model(str(path))
    header = np.frombuffer(raw[:1024], dtype="<i4").copy()
    header[1] = 2
    path.write_bytes(header.tobytes() + raw[1024:])
    with pytest.raises(PotqError, match="version 2; potq reads versions 3"):
        potq.load_model(str(path))
