"""Untrusted files and the user's own files (docs/reliability.md): no code runs from a model
folder, nothing is allocated before it is validated, a folder's description is tied to its
tensors, the kernel cache never hangs or crashes a process, outputs are never lost."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

import potq
from potq.cli import main
from potq.errors import PotqError
from potq.storage import verify
from tests.hostile import resign

IDS = torch.tensor([[1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298]])


def one_line_error(call, *words: str) -> str:
    with pytest.raises(PotqError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and all(w in message for w in words), message
    return message


@pytest.fixture
def packed(stories, tmp_path) -> Path:
    potq.quantize_(stories.model, potq.PoTConfig(bits=3, group_size=32), progress=False)
    return potq.save(stories, tmp_path / "m")


def tiny_llama_folder(folder: Path, stories, layers: int = 2, **config) -> Path:
    torch.manual_seed(0)
    settings = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(LlamaConfig(**{**settings, **config})).save_pretrained(folder)
    stories.tokenizer.backend.save(str(folder / "tokenizer.json"))
    return folder


# --- nothing executes from a model ---------------------------------------------------------------
REMOTE_CODE = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\n"


@pytest.mark.parametrize("model_type", ["llama", "evil"])
def test_no_code_runs_from_a_model_folder(stories, tmp_path, model_type):
    folder = tiny_llama_folder(tmp_path / "hf", stories)
    marker = tmp_path / "marker"
    (folder / "configuration_evil.py").write_text(REMOTE_CODE.format(marker=str(marker)))
    (folder / "modeling_evil.py").write_text(REMOTE_CODE.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                                   "AutoModelForCausalLM": "modeling_evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(config))
    if model_type == "llama":  # a supported type: loaded by transformers' own class, the folder's code ignored
        potq.load_model(str(folder))
    else:
        one_line_error(lambda: potq.load_model(str(folder)), "'evil'")
    assert not marker.exists()


def test_pickles_are_refused(stories, tmp_path):
    folder = tiny_llama_folder(tmp_path / "hf", stories)
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    one_line_error(lambda: potq.load_model(str(folder)), "pickled", "pytorch_model.bin")
    (folder / "model.safetensors").write_bytes(b"junk that is not safetensors")  # never falls back to the pickle
    one_line_error(lambda: potq.load_model(str(folder)), "model.safetensors")


def test_calibration_never_opens_a_path_from_metadata(char_model):
    from potq.eval.data import training_batch

    source = {**char_model.source, "path": "/etc/passwd", "sha256": "0" * 64}
    one_line_error(lambda: training_batch(char_model.tokenizer, source, 2, 16, 0), "other than the shared")
    batch = training_batch(char_model.tokenizer, {**char_model.source, "path": "/etc/passwd"}, 2, 16, 0)
    assert batch.shape == (2, 16)  # the recorded sha256 names the shared text, which is what is read


# --- validate, then allocate ------------------------------------------------------------------------
def test_hf_config_must_match_the_weights(stories, tmp_path):
    folder = tiny_llama_folder(tmp_path / "hf", stories, layers=3)
    config = json.loads((folder / "config.json").read_text())
    for field, value, words in (("num_hidden_layers", 2, ("layers.2",)), ("num_hidden_layers", 100000, ("100000",)),
                                ("hidden_size", 65536, ("shape",)), ("vocab_size", 2**31, ("vocab_size",)),
                                ("num_hidden_layers", 2.5, ("2.5",))):
        (folder / "config.json").write_text(json.dumps({**config, field: value}))
        start = time.perf_counter()
        one_line_error(lambda: potq.load_model(str(folder)), *words)
        assert time.perf_counter() - start < 10


def test_tokenizer_larger_than_the_embedding(stories, tmp_path):
    folder = tiny_llama_folder(tmp_path / "hf", stories, vocab_size=256)
    one_line_error(lambda: potq.load_model(str(folder)), "512 tokens", "256 rows")


def test_memory_is_checked_before_allocating(stories, tmp_path, monkeypatch):
    import potq.limits

    folder = tiny_llama_folder(tmp_path / "hf", stories)
    monkeypatch.setattr(potq.limits, "memory_available", lambda: 1000)
    one_line_error(lambda: potq.load_model(str(folder)), "GiB of memory")


def test_fifo_tokenizer_is_refused_not_waited_on(packed):
    (packed / "tokenizer.json").unlink()
    os.mkfifo(packed / "tokenizer.json")
    one_line_error(lambda: potq.load(packed), "not a regular file")


# --- weights tied to their description --------------------------------------------------------------
def test_description_edits_are_caught(packed):
    reference = potq.load(packed).model(IDS).logits
    manifest = json.loads((packed / "potq.json").read_text())
    layer = "model.layers.0.self_attn.q_proj"

    edited = json.loads(json.dumps(manifest))
    edited["quantized_layers"][layer]["format"] = "uniform-sym"  # the wrong grid, same tensor shapes
    (packed / "potq.json").write_text(json.dumps(edited))
    one_line_error(lambda: potq.load(packed), "digest mismatch")

    for change, words in ((lambda m: m["aliases"].update({"lm_head.weight": "nothing.here"}), ("alias",)),
                          (lambda m: m["quantized_layers"][layer].update(group_size=float("nan")), ("NaN",)),
                          (lambda m: m["quantized_layers"][layer].update(group_size=32.0), ("group_size",)),
                          (lambda m: m["quantized_layers"][layer].update(format="uniform"), ("zeros",)),
                          (lambda m: m["architecture"]["config"].update(num_hidden_layers=100000), ("100000",)),
                          (lambda m: m["architecture"]["config"].update(hidden_size=65536), ("not a 64x64",))):
        edited = json.loads(json.dumps(manifest))
        change(edited)
        resign(packed, edited)
        one_line_error(lambda: potq.load(packed), *words)
    for text, words in (("[1, 2]", ("not an object",)), ("[" * 100000 + "]" * 100000, ("nested",)),
                        ('{"file_format_version": NaN}', ("NaN",))):
        resign(packed, text=text)
        one_line_error(lambda: potq.load(packed), *words)
    resign(packed, manifest)
    assert torch.equal(potq.load(packed).model(IDS).logits, reference)


def test_tensor_bytes_scales_and_dtypes_are_checked(packed):
    weights = packed / "model.safetensors"
    good = weights.read_bytes()
    flipped = bytearray(good)
    flipped[-5] ^= 0x10  # one bit of the last tensor's data
    weights.write_bytes(bytes(flipped))
    one_line_error(lambda: potq.load(packed), "checksum")
    one_line_error(lambda: verify(packed), "checksum")
    assert main(["info", str(packed)]) == 2

    weights.write_bytes(good)
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        metadata, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    from potq.storage import META_CONTENT, content_digest

    for name, bad, words in (("model.layers.0.self_attn.q_proj.scales", float("nan"), ("finite and positive",)),
                             ("model.layers.0.self_attn.q_proj.scales", -1.0, ("finite and positive",)),
                             ("model.norm.weight", None, ("I32",))):
        changed = dict(tensors)
        changed[name] = tensors[name].to(torch.int32) if bad is None else tensors[name].clone().fill_(bad)
        save_file(changed, str(weights), metadata={**metadata, META_CONTENT: content_digest(sorted(changed.items()))})
        one_line_error(lambda: potq.load(packed), *words)
    weights.write_bytes(good)
    verify(packed)


def test_info_and_verify_commands(packed, capsys):
    assert main(["verify", str(packed)]) == 0
    assert "ok" in capsys.readouterr().out
    (packed / "tokenizer.json").write_text((packed / "tokenizer.json").read_text().replace('"a"', '"b"', 1))
    assert main(["verify", str(packed)]) == 2
    assert "tokenizer.json is not the file" in capsys.readouterr().err


def test_info_into_a_closed_pipe_says_nothing(packed):
    run = subprocess.run(f"{sys.executable} -m potq.cli info {packed} | head -1", shell=True,
                         capture_output=True, text=True, timeout=120)
    assert run.stdout.count("\n") == 1 and "Traceback" not in run.stderr and "Error" not in run.stderr


def test_overflowing_loss_is_inf_not_a_traceback(stories, story_text):
    from potq.eval import perplexity

    with torch.no_grad():
        stories.model.lm_head.weight.mul_(1e4)
    result = perplexity(stories.model, stories.tokenizer, "tinystories", ctx=64, max_windows=1, dtype="fp32",
                        progress=False, text=story_text)
    assert math.isinf(result.ppl)


def test_potq_home_naming_a_file(tmp_path, monkeypatch):
    (tmp_path / "home").write_text("")
    monkeypatch.setenv("POTQ_HOME", str(tmp_path / "home"))
    from potq.paths import home_dir

    one_line_error(home_dir, "POTQ_HOME", "not a folder")


# --- the user's files -------------------------------------------------------------------------------
def test_existing_output_is_refused_before_any_work(packed, tmp_path, capsys, monkeypatch):
    import potq.models

    monkeypatch.setattr(potq.models, "load_model", lambda spec: pytest.fail("loaded before refusing"))
    assert main(["quantize", "stories260k", "-o", str(packed)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert main(["quantize", "stories260k", "-o", str(other), "--overwrite"]) == 2
    assert "not a potq model folder" in capsys.readouterr().err
    (packed / "notes.txt").write_text("keep me too")
    assert main(["quantize", "stories260k", "-o", str(packed), "--overwrite"]) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "keep me" and (packed / "notes.txt").is_file()


def test_overwrite_replaces_with_ordinary_permissions(packed, capsys):
    assert main(["quantize", "stories260k", "--bits", "4", "-o", str(packed), "--overwrite"]) == 0
    assert json.loads((packed / "potq.json").read_text())["bits"] == 4
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(packed.stat().st_mode) == 0o777 & ~umask
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask for p in packed.iterdir())
    assert sorted(p.name for p in packed.parent.iterdir() if p.name.startswith(".")) == []


def test_crash_between_renames_keeps_the_old_folder(stories, packed, monkeypatch):
    import potq.outputs

    before = potq.load(packed).model(IDS).logits
    monkeypatch.setattr(potq.outputs, "_exchange", lambda a, b: False)  # a system without renameat2
    real_replace, calls = os.replace, []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed between moving the old folder aside and the new one in
        real_replace(src, dst)

    monkeypatch.setattr(potq.outputs.os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        potq.save(stories, packed, overwrite=True)
    assert not packed.exists() and list(packed.parent.glob(".m.old-*"))
    monkeypatch.setattr(potq.outputs.os, "replace", real_replace)
    potq.outputs.recover(packed, "potq.json")  # what the next write to the same name does first
    assert torch.equal(potq.load(packed).model(IDS).logits, before)


def test_stale_temporary_siblings_are_cleaned(stories, packed):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = packed.parent / f".m.tmp-{dead.pid}-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    potq.save(stories, packed, overwrite=True)
    assert not stale.exists()


# --- the kernel cache -------------------------------------------------------------------------------
KERNEL_PROBE = "from potq.kernels import fused; print(fused.extension() is not None)"


@pytest.fixture
def kernel_home(fused_kernel, tmp_path) -> Path:
    """A POTQ_HOME holding a copy of this machine's built kernel (a rebuild is then a relink)."""
    from potq.kernels.fused import build_digest
    from potq.paths import home_dir

    home = tmp_path / "home"
    shutil.copytree(home_dir() / "kernels" / build_digest(), home / "kernels" / build_digest())
    return home


def probe(home: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "POTQ_HOME": str(home)}
    return subprocess.run([sys.executable, "-c", KERNEL_PROBE], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_killed_builder_leaves_no_hanging_lock(kernel_home):
    build = next((kernel_home / "kernels").iterdir())
    (build / "lock").write_text("")  # torch's own baton, left by a build killed with -9
    holder = subprocess.Popen([sys.executable, "-c",
                               f"import fcntl,time; f=open({str(build / '.potq.lock')!r},'a+'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    start = time.perf_counter()
    run = probe(kernel_home, timeout=120)
    assert run.stdout.strip() == "True", run.stderr
    assert time.perf_counter() - start < 120


def test_truncated_kernel_is_rebuilt_not_loaded(kernel_home):
    build = next((kernel_home / "kernels").iterdir())
    library = next(build.glob("*.so"))
    size = library.stat().st_size
    library.write_bytes(library.read_bytes()[:4096])
    run = probe(kernel_home)
    assert run.returncode == 0 and run.stdout.strip() == "True", run.stderr
    assert "does not match its build record" in run.stderr and library.stat().st_size == size


def test_unusable_kernel_home_falls_back_in_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    run = probe(tmp_path / "file")
    assert run.returncode == 0 and run.stdout.strip() == "False"
    assert run.stderr.count("\n") == 1 and "PyTorch path" in run.stderr
