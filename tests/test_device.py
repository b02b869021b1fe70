"""``--device cpu|cuda|auto``: the choice, its one-line error without a GPU, and — where a GPU is
present — the block-wise engine, GPTQ, QAT, eval and generate on it agreeing with the CPU."""

import copy

import pytest
import torch

import potq
from potq import devices
from potq.errors import PotqError
from tests.test_cli import assert_one_line_error, run

GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (none here: the GPU path is not measured)")


def test_auto_is_the_gpu_when_there_is_one():
    assert devices.resolve("cpu") == torch.device("cpu")
    assert devices.resolve("auto").type == ("cuda" if GPU else "cpu")
    with pytest.raises(PotqError, match="unknown device"):
        devices.resolve("tpu")


@pytest.mark.skipif(GPU, reason="a GPU is present")
def test_cuda_without_a_gpu_is_one_line(capsys, tmp_path):
    with pytest.raises(PotqError, match="sees no CUDA GPU"):
        devices.resolve("cuda")
    for argv in (["quantize", "stories260k", "--device", "cuda", "-o", str(tmp_path / "q")],
                 ["eval", "stories260k", "--device", "cuda", "--max-windows", "1"]):
        assert_one_line_error(*run(capsys, *argv)[::2], "--device cuda")
    assert not (tmp_path / "q").exists()


def test_the_context_and_moving_nested_values():
    value = {"a": torch.ones(2), "b": (torch.zeros(1), None), "c": [torch.ones(1)], "d": 3}
    assert devices.current() == devices.CPU
    with devices.using("cpu") as device:
        assert device == devices.current() == devices.CPU
        moved = devices.to_current(value)
    assert moved["d"] == 3 and moved["b"][1] is None and torch.equal(moved["a"], value["a"])


def test_the_cpu_device_changes_nothing(stories):
    """``device="cpu"`` given explicitly is the default run, byte for byte."""
    other = potq.LoadedModel(copy.deepcopy(stories.model), stories.tokenizer, stories.source)
    config = potq.QuantConfig("pot", 3, 32)
    settings = dict(calib_samples=4, calib_len=64, epochs=1, progress=False)
    potq.quantize_(stories, config, method="twostep", **settings)
    potq.quantize_(other, config, method="twostep", device="cpu", **settings)
    for (name, a), (_, b) in zip(stories.model.state_dict().items(), other.model.state_dict().items()):
        assert torch.equal(a, b), name


@needs_gpu
@pytest.mark.parametrize("method", ["rtn", "grid", "twostep", "gptq", "awq", "omniquant"])
def test_gpu_quantization_agrees_with_the_cpu(stories, method):
    """The same method on the GPU: nearly every code equal (float sums differ in the last bits),
    the model stays in CPU memory and the packed result is on the CPU."""
    other = potq.LoadedModel(copy.deepcopy(stories.model), stories.tokenizer, stories.source)
    config = potq.QuantConfig("pot", 3, 32)
    settings = dict(calib_samples=4, calib_len=64, progress=False) if method != "rtn" and method != "grid" else {}
    if method in ("twostep", "omniquant"):
        settings["epochs"] = 1
    potq.quantize_(stories, config, method=method, device="cpu", **settings)
    potq.quantize_(other, config, method=method, device="cuda", **settings)
    state = other.model.state_dict()
    assert all(t.device.type == "cpu" for t in state.values())
    codes = [(a, state[name]) for name, a in stories.model.state_dict().items() if name.endswith(".codes")]
    same = sum(int((a == b).sum()) for a, b in codes) / sum(a.numel() for a, _ in codes)
    assert same > 0.98


@needs_gpu
def test_gpu_eval_generate_and_qat(stories, story_text):
    cpu = potq.perplexity(stories.model, stories.tokenizer, story_text, ctx=128, max_windows=4, dtype="fp32").ppl
    gpu_model = copy.deepcopy(stories.model).cuda()
    gpu = potq.perplexity(gpu_model, stories.tokenizer, story_text, ctx=128, max_windows=4, dtype="fp32").ppl
    assert gpu == pytest.approx(cpu, rel=1e-3)
    assert potq.generate(gpu_model, stories.tokenizer, "Once", max_new_tokens=8) == \
        potq.generate(stories.model, stories.tokenizer, "Once", max_new_tokens=8)
    potq.quantize_(stories, potq.QuantConfig("pot", 4, 32), method="qat", device="cuda", steps=4, batch_size=2,
                   calib_samples=8, calib_len=64, progress=False)
    assert all(t.device.type == "cpu" for t in stories.model.state_dict().values())
