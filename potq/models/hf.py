"""Hugging Face model folders (``config.json`` + safetensors), and empty models of any config.

Every loader ends in a transformers model, so quantization, evaluation and storage work on one
kind of module; this file also owns the shared "empty model" step the other loaders build on.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer as BackendTokenizer
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.initialization import no_init_weights
from transformers.pytorch_utils import Conv1D

from potq.errors import PotqError, first_line
from potq.models.arch import check_supported, is_moe
from potq.models.experts import unfuse_experts
from potq.models.tokenizer import TOKENIZER_FILE, Tokenizer

CONFIG_FILE = "config.json"


def empty_model(config: PretrainedConfig, linear: bool = True) -> PreTrainedModel:
    """An eval-mode float32 model of ``config`` with uninitialised weights, on the current
    default device (under ``torch.device("meta")`` a skeleton that costs no memory, which the
    loaders compare with a file's tensors before allocating anything).

    Random initialisation costs seconds for a 135M model and is overwritten at once by the real
    weights, so it is skipped; skipping it also skips weight tying, which is redone here.
    ``linear=False`` keeps GPT-2's ``Conv1D`` layers, as its checkpoints store them.
    """
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()
    return (as_linear_layers(model) if linear else model).eval()


# config switches that change what a forward pass returns, not what the model computes
PLAIN_OUTPUTS = {"return_dict": True, "output_hidden_states": False, "output_attentions": False,
                 "torchscript": False}


def plain_outputs(config: PretrainedConfig) -> PretrainedConfig:
    """``config`` with the output switches potq's callers rely on (a file may set them otherwise)."""
    for key, value in PLAIN_OUTPUTS.items():
        setattr(config, key, value)
    return config


def as_linear_layers(model: PreTrainedModel) -> PreTrainedModel:
    """Replace GPT-2's ``Conv1D`` (a linear layer storing its weight as ``[in, out]``) by the
    equivalent ``nn.Linear``, so every family offers quantization the same kind of layer.

    Applied both on load and on rebuild, so saved state dicts always hold ``[out, in]`` weights.
    Fused MoE experts become a linear per expert the same way (:mod:`potq.models.experts`).
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
    return unfuse_experts(model)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def weight_files(folder: Path) -> list[Path]:
    """The folder's safetensors files in a fixed order (one, or the shards of a sharded save).

    Pickled weights (``pytorch_model.bin``...) can run code when unpickled, so potq never reads
    them: a folder that has only those is refused, and beside safetensors they are ignored."""
    files = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise PotqError(f"{folder} holds only pickled weights ({pickles[0]}), which potq never loads "
                            "(unpickling can run code): convert them to safetensors first")
        raise PotqError(f"{folder} has no *.safetensors weights; save the model with safe_serialization")
    return files


def load(folder: Path) -> tuple[PreTrainedModel, Tokenizer]:
    """The model and tokenizer of a Hugging Face folder, read from disk only: no code from the
    folder runs (``trust_remote_code=False``), only safetensors are read, and the tensors are
    checked against the config before the model is allocated."""
    config = read_config(folder)
    files = weight_files(folder)
    check_weights(folder, config, files)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, config=config, local_files_only=True, dtype=torch.float32, output_loading_info=True,
            trust_remote_code=False, use_safetensors=True,
        )
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise PotqError(f"cannot read the weights in {folder} ({first_line(exc)}); re-save the model") from None
    if info["missing_keys"]:  # transformers would run them randomly initialised; wrong shapes raise above
        missing = ", ".join(sorted(info["missing_keys"])[:3])
        raise PotqError(f"{folder} lacks weights ({missing}...); re-save the model")
    return as_linear_layers(model).eval(), folder_tokenizer(folder, config)


def check_weights(folder: Path, config: PretrainedConfig, files: list[Path], whole_model: bool = True) -> None:
    """The safetensors headers hold every tensor the config's model needs, of the right shape,
    and no block the config does not have — checked on a meta-device skeleton, and the memory
    the model needs checked against what is available, before anything is allocated."""
    from potq.limits import check_memory, check_tensors, float_bytes

    present: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    present[key] = tuple(f.get_slice(key).get_shape())
                    if f.get_slice(key).get_dtype() not in ("F32", "F16", "BF16"):
                        raise PotqError(f"{file}: tensor {key} is {f.get_slice(key).get_dtype()}, not a float "
                                        "type; the file is corrupt or not a model's weights")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise PotqError(f"{file} is not a readable safetensors file ({first_line(exc)}); re-save the model") \
                from None
    try:
        with torch.device("meta"):
            skeleton = empty_model(config, linear=False)
    except Exception as exc:  # any failure of transformers to build the config's model: a bad config
        raise PotqError(f"{folder / CONFIG_FILE} describes no buildable model ({first_line(exc)}); fix it") from None
    prefix = f"{skeleton.base_model_prefix}."
    names: dict[int, list[str]] = {}  # a tied weight (the output head) is one parameter under two names
    for name, parameter in skeleton.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name.removeprefix(prefix))
    tied = {name for group in names.values() for name in group[1:]}
    stored = skeleton.state_dict()
    rename = renaming(skeleton)
    if is_moe(config):  # checkpoints keep each expert apart: compare with the layout transformers saves
        from transformers.core_model_loading import revert_weight_conversion

        stored, rename = revert_weight_conversion(skeleton, stored), (lambda key: key)
    expected = {k.removeprefix(prefix): tuple(v.shape) for k, v in stored.items()}
    expected = {k: v for k, v in expected.items() if k not in tied}
    present = {rename(k).removeprefix(prefix): v for k, v in present.items()}
    ignored = {k for k in present for pattern in skeleton._keys_to_ignore_on_load_unexpected or []
               if re.search(pattern, k)}
    check_tensors(expected, {k: v for k, v in present.items() if k in expected or k not in ignored},
                  str(folder), allowed_extra=tied)
    if whole_model:  # a streamed quantization holds one block at a time
        check_memory(2 * float_bytes(expected), f"loading {folder}")


def renaming(skeleton: PreTrainedModel) -> Callable[[str], str]:
    """A checkpoint key -> the name transformers loads it as (its own renaming rules, e.g.
    GPT-NeoX's ``embed_out`` -> ``lm_head``), so the check compares like with like."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    rules = [(re.compile(source), target) for rule in get_model_conversion_mapping(skeleton)
             if isinstance(rule, WeightRenaming) for source, target in zip(rule.source_patterns, rule.target_patterns)]

    def rename(key: str) -> str:
        for source, target in rules:
            key = source.sub(target, key)
        return key

    return rename


def read_config(folder: Path) -> PretrainedConfig:
    """The folder's config, or an error unless it describes a model class potq supports.

    The JSON is read and checked by potq first (size, limits, ``model_type``), so transformers
    never sees a config naming code to import."""
    from potq.limits import check_config, load_json_object, read_small_file

    raw = load_json_object(read_small_file(folder / CONFIG_FILE, "the config"), str(folder / CONFIG_FILE))
    check_supported(raw.get("model_type"), str(folder))
    check_config(raw, str(folder / CONFIG_FILE))
    try:
        return plain_outputs(AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False))
    except Exception as exc:  # transformers' validators raise their own types for a config value of a wrong type
        raise PotqError(f"cannot read {folder / CONFIG_FILE} ({first_line(exc)}); fix or re-save it") from None


def folder_tokenizer(folder: Path, config: PretrainedConfig) -> Tokenizer:
    """The folder's ``tokenizer.json`` with BOS/EOS from the config (a GPT-2 folder without one
    gets GPT-2's BPE from the shared folder).

    Whether BOS starts a text is read off the tokenizer's own post-processor (what
    ``add_special_tokens=True`` would add), because that is where HF folders record the habit.
    """
    from potq.limits import MAX_TOKENIZER_BYTES, read_small_file

    path = folder / TOKENIZER_FILE
    if config.model_type == "gpt2" and not path.exists():  # GPT-2 folders often ship only vocab files
        from potq.models.gpt2_bpe import gpt2_tokenizer

        return gpt2_tokenizer()
    raw = read_small_file(path, "the tokenizer", MAX_TOKENIZER_BYTES)
    try:
        backend = BackendTokenizer.from_str(raw.decode("utf-8"))
    except Exception as exc:  # tokenizers raises a bare Exception for missing or malformed files
        raise PotqError(f"cannot read {path} ({first_line(exc)}); put the model's tokenizer.json beside it") from None
    bos, eos = _single_id(config.bos_token_id), _single_id(config.eos_token_id)
    with_specials = backend.encode("a", add_special_tokens=True).ids
    add_bos = bos is not None and with_specials[:1] == [bos]
    return Tokenizer(backend, bos, eos, add_bos=add_bos, chat_template=chat_template(folder))


CHAT_TEMPLATE_FILE = "chat_template.jinja"


def chat_template(folder: Path) -> str | None:
    """An instruct model's conversation template: ``chat_template.jinja`` (transformers 5), else the
    ``chat_template`` string of ``tokenizer_config.json``; None for a base model."""
    from potq.limits import MAX_TOKENIZER_BYTES, load_json_object, read_small_file

    if (folder / CHAT_TEMPLATE_FILE).is_file():
        raw = read_small_file(folder / CHAT_TEMPLATE_FILE, "the chat template", MAX_TOKENIZER_BYTES)
        return raw.decode("utf-8", errors="replace")
    if (folder / "tokenizer_config.json").is_file():
        config = load_json_object(read_small_file(folder / "tokenizer_config.json", "the tokenizer config",
                                                  MAX_TOKENIZER_BYTES), str(folder / "tokenizer_config.json"))
        template = config.get("chat_template")
        return template if isinstance(template, str) else None
    return None


def _single_id(token_id: int | list[int] | None) -> int | None:
    """One id from a config field that may hold a list (several EOS ids): the first one."""
    if isinstance(token_id, list):
        return token_id[0] if token_id else None
    return token_id

