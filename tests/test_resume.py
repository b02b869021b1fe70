"""A block-wise run killed part-way resumes from its last finished block and ends with the same
bytes as an uninterrupted run (potq.engine.resume)."""

import copy

import pytest
import torch

import potq
from potq.engine import resume
from potq.nn import PackedWeight

SETTINGS = {"twostep": {"epochs": 1}, "awq": {}, "gptq": {}, "omniquant": {"epochs": 1}}


def packed_state(lm) -> dict[str, torch.Tensor]:
    return {k: v for k, v in lm.model.state_dict().items()}


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_a_killed_run_resumes_to_the_same_bytes(stories_float, tmp_path, monkeypatch, method):
    def run(**extra):
        lm = potq.LoadedModel(copy.deepcopy(stories_float.model), stories_float.tokenizer, stories_float.source)
        potq.quantize_(lm, potq.PoTConfig(3, 32), method=method, calib_samples=4, calib_len=64, progress=False,
                       **SETTINGS[method], **extra)
        return lm

    reference = packed_state(run())
    checkpoint = tmp_path / "ckpt"
    save = resume.Checkpoint.save

    def killed_after_block_2(self, index, *args):
        save(self, index, *args)
        if index == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(resume.Checkpoint, "save", killed_after_block_2)
    with pytest.raises(KeyboardInterrupt):
        run(resume_dir=str(checkpoint))
    monkeypatch.setattr(resume.Checkpoint, "save", save)
    assert (checkpoint / "block-2.safetensors").is_file()
    resumed = run(resume_dir=str(checkpoint))
    state = packed_state(resumed)
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    assert any(isinstance(m, PackedWeight) for m in resumed.model.modules())


def test_a_checkpoint_of_another_run_is_discarded(stories_float, tmp_path):
    lm = potq.LoadedModel(copy.deepcopy(stories_float.model), stories_float.tokenizer, stories_float.source)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "resume.json").write_text('{"fingerprint": "another run", "done": 3}')
    potq.quantize_(lm, potq.PoTConfig(3, 32), method="gptq", calib_samples=4, calib_len=64, progress=False,
                   resume_dir=str(tmp_path / "ckpt"))
    assert '"another run"' not in (tmp_path / "ckpt" / "resume.json").read_text()


@pytest.mark.parametrize("method", ["awq", "twostep"])
def test_a_killed_lazy_run_resumes_to_the_same_bytes(stories_float, tmp_path, monkeypatch, method):
    """The same for a model whose blocks are read from the files in turn (``lazy=True``, what
    ``potq quantize`` does with a Hugging Face folder): restored blocks come back from the
    checkpoint, not the source, AWQ's folded norms included."""
    from tests.zoo import tiny_folder

    folder = tiny_folder("qwen2", tmp_path / "qwen2", stories_float.tokenizer)

    def run(**extra):
        lm = potq.load_model(str(folder), lazy=True)
        potq.quantize_(lm, potq.PoTConfig(3, 32), method=method, calib_samples=4, calib_len=32, progress=False,
                       **SETTINGS[method], **extra)
        return lm

    reference = packed_state(run())
    save = resume.Checkpoint.save

    def killed_after_block_0(self, index, *args):
        save(self, index, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(resume.Checkpoint, "save", killed_after_block_0)
    with pytest.raises(KeyboardInterrupt):
        run(resume_dir=str(tmp_path / "ckpt"))
    monkeypatch.setattr(resume.Checkpoint, "save", save)
    state = packed_state(run(resume_dir=str(tmp_path / "ckpt")))
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in reference)
