"""Loading models into one shape (imported lazily through :mod:`potq.models`): a float32, eval-mode transformers causal LM plus a Tokenizer.

``load_model`` takes a short name (see :data:`SHORT_NAMES`) or a path: a ``.gguf`` file, a
llama2.c or llm.c ``.bin`` checkpoint, or a Hugging Face folder (``config.json`` + safetensors). Whatever the
source, quantization and evaluation see a ``LlamaForCausalLM`` or ``GPT2LMHeadModel``, and
``architecture``/``build_model`` let a saved quantized model be rebuilt without the source file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, PreTrainedModel

from potq.errors import PotqError
from potq.limits import check_vocabulary
from potq.models import arch as decoder
from potq.models import gguf, hf, llama2c, llmc
from potq.models.registry import SHORT_NAMES, resolve
from potq.models.tokenizer import Tokenizer
from potq.paths import sha256_of_files

__all__ = ["SHORT_NAMES", "LoadedModel", "architecture", "build_model", "load_model", "transformer_blocks"]


LOADERS: dict[str, Callable[[Path], tuple[PreTrainedModel, Tokenizer]]] = {
    "gguf": gguf.load, "llama2c": llama2c.load, "llmc": llmc.load, "hf": hf.load,
}


@dataclass
class LoadedModel:
    """A loaded model, its tokenizer, and where it came from (JSON-able, for reports and saved files)."""

    model: torch.nn.Module
    tokenizer: Tokenizer
    source: dict


def load_model(spec: str, lazy: bool = False) -> LoadedModel:
    """The model named by ``spec`` (a short name or a path), in float32 and eval mode.

    A short name of a model potq trained (``nanogpt-shakespeare``) or a path to any potq folder
    is read by :func:`potq.storage.load`, so every command takes it like a source model.

    ``lazy=True``, for a Hugging Face folder or a ``llama`` GGUF: the transformer blocks stay in
    the files until a block-wise :func:`potq.quantize_` reads them one at a time
    (:class:`potq.models.lazy.LazyBlocks`), so a model larger than memory quantizes; such a model
    is for quantizing only. Other sources (GGUFs read by transformers, MoE checkpoints — see
    :func:`potq.models.lazy.readable_by_name`) load whole.
    """
    name, path = resolve(spec)
    from potq.storage import is_potq_folder, load  # storage builds on this module: import on use
    from potq.models.lazy import hf_lazy_model, readable_by_name

    if is_potq_folder(path):
        return load(path)
    kind = _loader_kind(path)
    lazily = {"hf": lambda: hf_lazy_model(path) if readable_by_name(path) else None, "gguf": lambda: gguf.lazy_load(path)}
    loaded = lazily[kind]() if lazy and kind in lazily else None  # None: this source loads whole
    model, tokenizer = loaded if loaded is not None else LOADERS[kind](path)
    check_vocabulary(tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, model.config.to_dict(), str(path))
    files = hf.weight_files(path) if path.is_dir() else [path]
    source = {"name": name, "path": str(path), "sha256": sha256_of_files(files), "loader": kind}
    return LoadedModel(model=model, tokenizer=tokenizer, source=source)


def architecture(model: torch.nn.Module) -> dict:
    """A JSON-able description from which :func:`build_model` makes an empty model of the same shape."""
    if not isinstance(model, PreTrainedModel):
        raise PotqError(f"cannot describe a {type(model).__name__}; potq handles transformers models only")
    return {"family": "hf", "config": model.config.to_dict()}


def build_model(arch: dict) -> torch.nn.Module:
    """An eval-mode float32 model of ``arch`` (from :func:`architecture`) with uninitialised weights."""
    config = arch.get("config") if arch.get("family") == "hf" else None
    if not isinstance(config, dict):
        raise PotqError("the saved architecture is not a {'family': 'hf'} description; re-save the model with this potq")
    decoder.check_supported(config.get("model_type"), "the saved architecture")
    try:
        config = hf.plain_outputs(AutoConfig.for_model(**config))
        return hf.empty_model(config)
    except Exception as exc:  # transformers' config validators raise types of their own
        raise PotqError(f"cannot rebuild the saved architecture ({hf.first_line(exc)}); re-save the model") from None


def transformer_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's transformer blocks in order, the unit block-wise quantization works on."""
    return decoder.decoder_blocks(model)


def _loader_kind(path: Path) -> str:
    """Which loader reads ``path``, from its suffix, or from ``config.json`` for a folder."""
    if path.is_dir():
        if not (path / hf.CONFIG_FILE).is_file():
            raise PotqError(f"{path} is a folder without {hf.CONFIG_FILE}; give a Hugging Face model folder, "
                            "a .gguf file or a llama2.c .bin checkpoint")
        return "hf"
    kinds = {".gguf": "gguf", ".bin": "llama2c"}
    if path.suffix.lower() not in kinds:
        raise PotqError(f"{path}: unknown model file type; give a .gguf file, a llama2.c or llm.c .bin "
                        "checkpoint or a Hugging Face model folder")
    if kinds[path.suffix.lower()] == "llama2c" and llmc.is_llmc(path):
        return "llmc"
    return kinds[path.suffix.lower()]
