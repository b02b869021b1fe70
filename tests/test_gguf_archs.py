"""GGUF files of architectures beyond 'llama' (read through transformers' own GGUF loader after
potq's checks), written with the gguf package's writer (tests/gguf_writer.py)."""

from __future__ import annotations

import pytest
import torch

import potq
from potq.errors import PotqError
from tests.gguf_writer import write_gguf
from tests.zoo import tiny_model

IDS = torch.tensor([[1, 403, 407, 261, 378, 432]])


def as_released(kind: str):  # noqa: ANN201
    """The tiny model of ``kind`` with the settings transformers' GGUF reader assumes rather than
    reads (those of the released models): Qwen3's head size 128, Qwen3-MoE's expert width 768 and
    normalised top-k, Gemma's query scale 256 and 4 extra special tokens; None: the zoo's model."""
    import transformers as T

    from tests.zoo import COMMON

    wide = {**COMMON, "vocab_size": COMMON["vocab_size"] + 4}
    configs = {"qwen3": lambda: T.Qwen3Config(**COMMON, head_dim=128),
               "qwen3_moe": lambda: T.Qwen3MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, head_dim=128,
                                                     moe_intermediate_size=768, norm_topk_prob=True),
               "gemma2": lambda: T.Gemma2Config(**wide, head_dim=16, sliding_window=128),
               "gemma3_text": lambda: T.Gemma3TextConfig(**wide, head_dim=16, sliding_window=128)}
    if kind not in configs:
        return None
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(configs[kind]()).eval()


@pytest.mark.parametrize("kind,tensor_type,tolerance", [
    ("qwen2", "F32", 0.0), ("qwen2", "Q8_0", 0.05), ("qwen3", "F32", 0.0), ("mistral", "Q8_0", 0.05),
    ("phi3", "F32", 0.0), ("gemma2", "F32", 0.0), ("gemma3_text", "Q8_0", 0.05), ("qwen3_moe", "F32", 0.0)])
def test_a_gguf_loads_quantizes_and_round_trips(kind, tensor_type, tolerance, tmp_path, stories_float):
    source = write_gguf(kind, tmp_path / "m.gguf", tensor_type, as_released(kind))
    lm = potq.load_model(str(tmp_path / "m.gguf"))
    with torch.no_grad():
        assert (lm.model(IDS).logits - source(IDS).logits).abs().max() <= tolerance
    text = "Once upon a time"
    if not kind.startswith("gemma"):  # Gemma's SentencePiece has no dummy prefix: the same vocabulary splits otherwise
        assert lm.tokenizer.encode(text) == stories_float.tokenizer.encode(text)
    assert lm.tokenizer.decode(lm.tokenizer.encode(text)) == text
    potq.quantize_(lm, potq.PoTConfig(3, 32), progress=False)
    with torch.inference_mode():
        logits = lm.model(IDS).logits
        assert torch.equal(potq.load(potq.save(lm, tmp_path / "packed")).model(IDS).logits, logits)


def test_a_hostile_gguf_header_is_refused_before_transformers_reads_it(tmp_path):
    from tests.hostile import gguf_field_offset

    write_gguf("qwen2", tmp_path / "m.gguf")
    offset, length = gguf_field_offset(tmp_path / "m.gguf", "qwen2.block_count")
    data = bytearray((tmp_path / "m.gguf").read_bytes())
    data[offset:offset + length] = (100000).to_bytes(length, "little")
    (tmp_path / "m.gguf").write_bytes(bytes(data))
    with pytest.raises(PotqError, match="block_count"):
        potq.load_model(str(tmp_path / "m.gguf"))


def test_every_listed_tensor_type_dequantizes():
    """The types potq's reader accepts are exactly ones the gguf package decodes: one zero block each."""
    import gguf
    import numpy as np

    from potq.models.gguf import EXPANDED_TYPES

    for kind in EXPANDED_TYPES:
        block, nbytes = gguf.GGML_QUANT_SIZES[kind]
        values = gguf.quants.dequantize(np.zeros((1, nbytes), dtype=np.uint8), kind)
        assert values.shape == (1, block) and np.isfinite(values).all(), kind.name


def test_an_i_quant_gguf_reads_exactly_what_llama_cpp_stores(tmp_path):
    """IQ4_NL weights (llama.cpp's non-linear 4-bit i-quant) come out as the gguf package decodes them."""
    import gguf

    from tests.gguf_writer import iq4_nl_blocks

    write_gguf("mistral", tmp_path / "m.gguf", "IQ4_NL")
    lm = potq.load_model(str(tmp_path / "m.gguf"))
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    stored = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    assert stored.tensor_type == gguf.GGMLQuantizationType.IQ4_NL
    down = lm.model.model.layers[0].mlp.down_proj.weight
    expected = gguf.quants.dequantize(iq4_nl_blocks(tuple(down.shape)), gguf.GGMLQuantizationType.IQ4_NL)
    assert torch.equal(down, torch.from_numpy(expected))
    potq.quantize_(lm, potq.PoTConfig(3, 32), progress=False)


def test_a_q8_0_table_stays_8_bit_and_the_folder_is_not_larger_than_the_gguf(tmp_path):
    """A GGUF's Q8_0 embedding, expanded to float on load, is packed back onto its own 8-bit grid
    (bit for bit the same values), so the packed folder is smaller than the GGUF it came from."""
    from potq.info import summary
    from potq.nn import QuantEmbedding

    write_gguf("qwen2", tmp_path / "m.gguf", "Q8_0")
    lm = potq.load_model(str(tmp_path / "m.gguf"))
    table = lm.model.model.embed_tokens.weight.detach().clone()
    potq.quantize_(lm, potq.PoTConfig(3, 32), progress=False)
    packed = lm.model.model.embed_tokens
    assert isinstance(packed, QuantEmbedding) and packed.fmt.name == "uniform-sym" and packed.fmt.bits == 8
    assert torch.equal(packed(torch.arange(table.shape[0])), table)
    folder = potq.save(lm, tmp_path / "packed")
    assert summary(folder)["file_bytes"] < (tmp_path / "m.gguf").stat().st_size
    float_source = potq.load_model(str(write_gguf_path(tmp_path, "F32")))
    potq.quantize_(float_source, potq.PoTConfig(3, 32), progress=False)
    assert not isinstance(float_source.model.model.embed_tokens, QuantEmbedding)  # not on a grid: stays float


def write_gguf_path(tmp_path, tensor_type: str):  # noqa: ANN001, ANN201
    write_gguf("qwen2", tmp_path / f"{tensor_type}.gguf", tensor_type)
    return tmp_path / f"{tensor_type}.gguf"


@pytest.mark.parametrize("method, tied", [("gptq", False), ("awq", False), ("gptq", True)])
def test_a_llama_gguf_quantizes_lazily_to_the_same_tensors(method, tied, tmp_path):
    """``lazy=True`` on a llama GGUF: each block's tensors are dequantized from the file when the
    engine reaches them (q/k reordered as on a whole load); the result equals the whole load's.
    Tied (SmolLM2's GGUF): the Q8_0 token table is packed losslessly before the blocks, and the
    head, absent from the file, must become that packed table, not a float copy or an error."""
    from potq.models import transformer_blocks

    write_gguf("mistral", tmp_path / "m.gguf", "Q8_0", tiny_model("mistral", tie_word_embeddings=True) if tied else None)
    lazy = potq.load_model(str(tmp_path / "m.gguf"), lazy=True)
    assert all(p.is_meta for p in transformer_blocks(lazy.model).parameters())
    whole = potq.load_model(str(tmp_path / "m.gguf"))
    for lm in (lazy, whole):
        potq.quantize_(lm, potq.PoTConfig(3, 32), method=method, calib_samples=4, calib_len=32, progress=False)
    a, b = lazy.model.state_dict(), whole.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gemma3s_scaled_table_stays_scaled_when_packed(tmp_path):
    """Gemma-3 multiplies looked-up rows by √d inside its embedding module: the packed table (the
    lossless 8-bit one, and a saved and reloaded one) computes the same model."""
    from potq.nn import QuantEmbedding
    from potq.quantize import pack_exact_tables_

    write_gguf("gemma3_text", tmp_path / "m.gguf", "Q8_0", as_released("gemma3_text"))
    lm = potq.load_model(str(tmp_path / "m.gguf"))
    with torch.no_grad():
        before = lm.model(IDS).logits
        assert pack_exact_tables_(lm.model)
        assert isinstance(lm.model.get_input_embeddings(), QuantEmbedding)
        torch.testing.assert_close(lm.model(IDS).logits, before, rtol=1e-4, atol=1e-4)
    lm = potq.load_model(str(tmp_path / "m.gguf"))
    potq.quantize_(lm, potq.PoTConfig(3, 32), progress=False)
    with torch.no_grad():
        logits = lm.model(IDS).logits
        assert torch.equal(potq.load(potq.save(lm, tmp_path / "packed")).model(IDS).logits, logits)
