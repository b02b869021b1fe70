"""GGUF files of architectures beyond 'llama' (read through transformers' own GGUF loader after
potq's checks), written with the gguf package's writer (tests/gguf_writer.py)."""

from __future__ import annotations

import pytest
import torch

import potq
from potq.errors import PotqError
from tests.gguf_writer import write_gguf

IDS = torch.tensor([[1, 403, 407, 261, 378, 432]])


def qwen3_with_real_head_dim():
    """transformers' GGUF reader takes Qwen3's head size as 128 (every released Qwen3's), not from the file."""
    import transformers as T

    from tests.zoo import COMMON

    torch.manual_seed(0)
    return T.Qwen3ForCausalLM(T.Qwen3Config(**COMMON, head_dim=128)).eval()


@pytest.mark.parametrize("kind,tensor_type,tolerance", [("qwen2", "F32", 0.0), ("qwen2", "Q8_0", 0.05),
                                                        ("qwen3", "F32", 0.0), ("mistral", "Q8_0", 0.05)])
def test_a_gguf_loads_quantizes_and_round_trips(kind, tensor_type, tolerance, tmp_path, stories_float):
    model = qwen3_with_real_head_dim() if kind == "qwen3" else None
    source = write_gguf(kind, tmp_path / "m.gguf", tensor_type, model)
    lm = potq.load_model(str(tmp_path / "m.gguf"))
    with torch.no_grad():
        assert (lm.model(IDS).logits - source(IDS).logits).abs().max() <= tolerance
    text = "Once upon a time"
    assert lm.tokenizer.encode(text) == stories_float.tokenizer.encode(text)
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
