"""`potq bench` runs end to end on the tiny model: the quick line, and the decoding table's
subprocess measurement (the full report on SmolLM2 is a benchmark, not a test)."""

import re

import pytest
import torch

import potq
from potq.bench import decode, dequant, gemv
from potq.cli import main


def test_quick_prints_the_speedup_last(capsys):
    assert main(["bench", "--quick", "--model", "stories260k", "--threads", "1"]) in (0, None)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"gemv pot3/fp32 speedup: \d+\.\d\d×", last), last


def test_decoding_runs_each_variant_in_its_own_process(tmp_path, fused_kernel):
    results = decode.run("stories260k", prompt_tokens=8, new_tokens=4, threads=1, variants=["float32", "pot3"],
                         cache=tmp_path, rounds=3)
    assert set(results) == {"float32", "pot3"}
    for r in results.values():  # the median of three rounds
        assert len(r["rounds_tokens_per_s"]) == 3 and r["tokens_per_s"] == sorted(r["rounds_tokens_per_s"])[1]
    assert all(r["tokens_per_s"] > 0 and r["peak_rss_mib"] > 0 for r in results.values())
    assert results["pot3"]["same_tokens_as_torch_path"] is True
    # the packed model reads about 3/32 of the float bytes per token (+ fp16 scales, float head if untied)
    assert results["pot3"]["weight_bytes_per_token"] < 0.5 * results["float32"]["weight_bytes_per_token"]
    assert (tmp_path / "stories260k-pot3-g128" / "potq.json").is_file()
    table = "\n".join(decode.markdown(results, 8, 4, read_gb_s=10.0))
    assert "| pot3 |" in table and "| float32 |" in table
    for r in results.values():  # the native decoder's step, and its own clock per phase
        parts = r["step_ms"]
        assert r["path"] == "native" and set(parts) == {"step", *decode.PHASES, "outside"}
        assert parts["step"] > 0 and parts["projections"] > 0 and r["prefill_tokens_per_s"] > 0
    assert "| pot3 |" in "\n".join(decode.breakdown_markdown(results))


def test_linear_shapes_are_the_models(stories_float):
    shapes = gemv.linear_shapes(stories_float.model)
    assert list(shapes)[0] == max(shapes, key=lambda s: s[0] * s[1])
    assert sum(len(names) for names in shapes.values()) == 5 * 7 + 1  # 5 blocks x 7 linears + the head


def test_gemv_times_the_native_layer_and_the_reading_says_what_limits_it(fused_kernel):
    """The 8-bit-activation layer is timed beside the fused kernel; hot against streamed decides
    whether the report blames its instructions or its reads."""
    from potq.bench import _products_limit

    assert gemv.measure_shape(torch.randn(256, 128), "hot", seconds=0.01)[gemv.Q8_COLUMN] > 0
    hot = {"(4096, 128)": {}, "(256, 128)": {gemv.Q8_COLUMN: 10.0}}
    streamed = lambda us: {"hot": hot, "decoding": {"(4096, 128)": {}, "(256, 128)": {gemv.Q8_COLUMN: us}}}  # noqa: E731
    assert "its instructions" in _products_limit(streamed(11.0), 5.0, 20.0)
    assert "a core waits on its reads" in _products_limit(streamed(30.0), 5.0, 20.0)
    assert "two cores' reads stay below" in _products_limit(streamed(30.0), 5.0, 20.0)
    assert "two cores' reads stay below" not in _products_limit(streamed(30.0), 25.0, 20.0)
    assert _products_limit({"hot": {"(4096, 128)": {}}, "decoding": {}}, 5.0, 20.0) == ""  # an older report


def test_the_reading_says_when_the_weights_stay_in_cache():
    """A last-level cache larger than a token's weights makes the memory bound no ceiling; the
    reading says so only then (and not for a report that did not record the cache)."""
    from potq.bench import _in_cache

    assert "stay in cache" in _in_cache(72 * 10**6, 480 * 2**20)
    assert _in_cache(72 * 10**6, 32 * 2**20) == "" and _in_cache(72 * 10**6, None) == ""


def test_dequantization_table_runs(fused_kernel):
    rows = dequant.run(rows=32, cols=256, seconds=0.01)
    assert {r["dtype"] for r in rows} == {"fp32", "fp16", "bf16"}
    assert all(r["pot_gelem_s"] > 0 for r in rows)
    assert "| PoT exponent add (Gelem/s) |" in "\n".join(dequant.markdown(rows, "32×256"))


def test_gguf_bits_per_weight_counts_block_matrices():
    """The peer rows' bits/weight: stored bytes of a GGUF's block matrices, block scales included
    (Q4_1: 16 bytes of codes + fp16 scale + fp16 min per 32 weights = 5 bits)."""
    from potq.bench.peer import block_bits_per_weight
    from potq.models.registry import resolve

    assert block_bits_per_weight(resolve("stories260k")[1]) == 32.0
    assert block_bits_per_weight(resolve("smollm2-135m")[1]) == 5.0


def test_load_watch_samples_while_a_job_runs():
    import time

    from potq.bench.timing import LoadWatch

    with LoadWatch(every=0.01) as load:
        time.sleep(0.1)
    assert len(load.samples) >= 3 and load.mean >= 0
    assert not load.shared(threads=10**6) and load.shared(threads=-2)


def test_report_renders_again_from_its_json(tmp_path, capsys):
    """`potq bench --render` rewrites the Markdown from the JSON report (here the checked-in one)."""
    import shutil
    from pathlib import Path

    shutil.copy(Path(__file__).parents[1] / "docs/results/speed.json", tmp_path / "speed.json")
    assert main(["bench", "--render", "--out", str(tmp_path / "speed.md")]) in (0, None)
    text = (tmp_path / "speed.md").read_text()
    for heading in ("## 1. Dequantization", "## 2. GEMV", "## 3. End-to-end", "## 4. Peer", "## Targets"):
        assert heading in text
    assert main(["bench", "--render", "--out", str(tmp_path / "elsewhere" / "speed.md")]) not in (0, None)
    assert "run `potq bench` first" in capsys.readouterr().err


def test_the_float_table_ablation_holds_the_same_values(tmp_path):
    """The int8-table benchmark's baseline: the GGUF's Q8_0 table back in float32, same values, head tied."""
    import torch
    from torch import nn

    from potq.bench.decode import _float_tables_
    from potq.nn import QuantEmbedding
    from tests.gguf_writer import write_gguf

    write_gguf("qwen2", tmp_path / "m.gguf", "Q8_0", model=_tied_qwen2())
    lm = potq.load_model(str(tmp_path / "m.gguf"))
    potq.quantize_(lm, potq.PoTConfig(3, 32), progress=False)
    packed, packed_head = lm.model.get_input_embeddings(), lm.model.get_output_embeddings()
    assert isinstance(packed, QuantEmbedding)
    values, head_values = packed.dequantize(), packed_head.dequantize()
    _float_tables_(lm.model)
    table, head = lm.model.get_input_embeddings(), lm.model.get_output_embeddings()
    assert type(table) is nn.Embedding and torch.equal(table.weight, values)
    assert type(head) is nn.Linear and torch.equal(head.weight, head_values)


def _tied_qwen2():  # noqa: ANN202
    import torch
    import transformers as T

    from tests.zoo import COMMON

    torch.manual_seed(0)
    return T.Qwen2ForCausalLM(T.Qwen2Config(**COMMON, tie_word_embeddings=True)).eval()


def test_vs_llamacpp_without_the_peer_is_one_line(capsys, monkeypatch):
    from potq.bench import peer

    monkeypatch.setattr(peer, "available", lambda: False)
    assert main(["bench", "--vs-llamacpp", "--model", "smollm2-135m"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "llama-cpp-python" in err


def test_a_peer_that_crashes_stops_the_bench_at_its_start_in_one_line(capsys, monkeypatch, tmp_path):
    """llama.cpp dying on a signal (its AMX path on some CPUs) is named before potq's own tables run."""
    import subprocess

    from potq.bench import dequant, peer

    monkeypatch.setattr(peer, "available", lambda: True)
    monkeypatch.setattr(peer, "files", lambda source: {"Q4_0": source})
    run = subprocess.run

    def segfault(cmd, *a, **k):  # noqa: ANN001, ANN202 — only the peer's process dies
        return subprocess.CompletedProcess(cmd, -11, "", "") if "potq.bench.peer" in cmd else run(cmd, *a, **k)

    monkeypatch.setattr(subprocess, "run", segfault)
    monkeypatch.setattr(dequant, "run", lambda: pytest.fail("the benchmark went on past a crashing peer"))
    assert main(["bench", "--model", "smollm2-135m", "--out", str(tmp_path / "speed.md")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "crashed" in err and "SIGSEGV" in err and "--no-peer" in err
    assert not list(tmp_path.iterdir())
