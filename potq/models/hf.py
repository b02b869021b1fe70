"""Hugging Face model folders (``config.json`` + safetensors), and empty models of any config.

Every loader ends in a transformers model, so quantization, evaluation and storage work on one
kind of module; this file also owns the shared "empty model" step the other loaders build on.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from safetensors import SafetensorError
from tokenizers import Tokenizer as BackendTokenizer
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.initialization import no_init_weights
from transformers.pytorch_utils import Conv1D

from potq.errors import PotqError, first_line
from potq.models.tokenizer import TOKENIZER_FILE, Tokenizer

CONFIG_FILE = "config.json"


class Family(NamedTuple):
    """A model family potq quantizes: its causal-LM class and where its transformer blocks live."""

    class_name: str
    blocks: str


# config.model_type -> family
SUPPORTED_MODELS = {
    "llama": Family("LlamaForCausalLM", "model.layers"),
    "gpt2": Family("GPT2LMHeadModel", "transformer.h"),
}


def empty_model(config: PretrainedConfig) -> PreTrainedModel:
    """An eval-mode float32 model of ``config`` with uninitialised weights.

    Random initialisation costs seconds for a 135M model and is overwritten at once by the real
    weights, so it is skipped; skipping it also skips weight tying, which is redone here.
    """
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()
    return as_linear_layers(model).eval()


def as_linear_layers(model: PreTrainedModel) -> PreTrainedModel:
    """Replace GPT-2's ``Conv1D`` (a linear layer storing its weight as ``[in, out]``) by the
    equivalent ``nn.Linear``, so every family offers quantization the same kind of layer.

    Applied both on load and on rebuild, so saved state dicts always hold ``[out, in]`` weights.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            in_features, out_features = module.weight.shape
            linear = nn.Linear(in_features, out_features, bias=module.bias is not None,
                               device=module.weight.device, dtype=module.weight.dtype)
            linear.weight = nn.Parameter(module.weight.detach().t().contiguous())
            if module.bias is not None:
                linear.bias = nn.Parameter(module.bias.detach())
            model.set_submodule(name, linear)
    return model


def weight_files(folder: Path) -> list[Path]:
    """The folder's safetensors files in a fixed order (one, or the shards of a sharded save)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise PotqError(f"{folder} has no *.safetensors weights; save the model with safe_serialization")
    return files


def load(folder: Path) -> tuple[PreTrainedModel, Tokenizer]:
    """The model and tokenizer of a Hugging Face folder, read from disk only."""
    config = _config(folder)
    weight_files(folder)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, config=config, local_files_only=True, dtype=torch.float32, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise PotqError(f"cannot read the weights in {folder} ({first_line(exc)}); re-save the model") from None
    if info["missing_keys"]:  # transformers would run them randomly initialised; wrong shapes raise above
        missing = ", ".join(sorted(info["missing_keys"])[:3])
        raise PotqError(f"{folder} lacks weights ({missing}...); re-save the model")
    return as_linear_layers(model).eval(), _tokenizer(folder, config)


def _config(folder: Path) -> PretrainedConfig:
    """The folder's config, or an error unless it describes a model class potq supports."""
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise PotqError(f"cannot read {folder / CONFIG_FILE} ({first_line(exc)}); fix or re-save it") from None
    if config.model_type not in SUPPORTED_MODELS:
        supported = ", ".join(family.class_name for family in SUPPORTED_MODELS.values())
        raise PotqError(f"{folder} holds a {config.model_type!r} model; potq supports {supported}")
    return config


def _tokenizer(folder: Path, config: PretrainedConfig) -> Tokenizer:
    """The folder's ``tokenizer.json`` with BOS/EOS from the config (a GPT-2 folder without one
    gets GPT-2's BPE from the shared folder).

    Whether BOS starts a text is read off the tokenizer's own post-processor (what
    ``add_special_tokens=True`` would add), because that is where HF folders record the habit.
    """
    path = folder / TOKENIZER_FILE
    if config.model_type == "gpt2" and not path.is_file():  # GPT-2 folders often ship only vocab files
        from potq.models.gpt2_bpe import gpt2_tokenizer

        return gpt2_tokenizer()
    try:
        backend = BackendTokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for missing or malformed files
        raise PotqError(f"cannot read {path} ({first_line(exc)}); put the model's tokenizer.json beside it") from None
    bos, eos = _single_id(config.bos_token_id), _single_id(config.eos_token_id)
    with_specials = backend.encode("a", add_special_tokens=True).ids
    add_bos = bos is not None and with_specials[:1] == [bos]
    return Tokenizer(backend, bos, eos, add_bos=add_bos)


def _single_id(token_id: int | list[int] | None) -> int | None:
    """One id from a config field that may hold a list (several EOS ids): the first one."""
    if isinstance(token_id, list):
        return token_id[0] if token_id else None
    return token_id

