"""Quantizing a model larger than memory: one block at a time, from memory-mapped safetensors.

For a Hugging Face folder and a method that quantizes each layer on its own (``rtn``, ``grid``
with its plain weight objective), the whole float model never exists:

1. the architecture is built on the meta device (no memory) and checked against the files;
2. each tensor is read from its memory-mapped shard when its turn comes — a block's linears,
   quantized by the method's own code, then dropped; the float tensors outside the blocks
   (embeddings, norms, head) one at a time;
3. the packed result is written as it is made (:class:`SafetensorsWriter`: the header, with every
   offset, first; the content checksum filled in at the end), in shards with an index when it is
   larger than :data:`potq.storage.MAX_SHARD_BYTES`.

Peak memory is about one block in float32 plus one float tensor, whatever the number of blocks.
The folder is the same as :func:`potq.quantize_` + :func:`potq.save` write in memory — the same
tensors, byte for byte, and the same ``potq.json`` but its time stamp (tested).
"""

from __future__ import annotations

import ctypes
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn
from tqdm import tqdm

from potq.config import QuantConfig
from potq.errors import PotqError

PLACEHOLDER = "0" * 64


def streams(method: str, settings: dict[str, Any], embeddings: bool) -> bool:
    """Whether ``method`` quantizes each layer on its own, with no data, so it can stream."""
    return not embeddings and (method == "rtn" or method == "grid" and settings.get("objective", "mse") == "mse")


def readable_by_name(folder: Path) -> bool:
    """Whether the folder's tensors are the model's own, name for name (so potq can read them one
    at a time). Not for MoE checkpoints: they store each expert apart, the model fuses them, and
    transformers does the conversion on a whole load."""
    from potq.models import hf
    from potq.models.arch import is_moe

    return not is_moe(hf.read_config(folder))


class HFTensors:
    """The tensors of a Hugging Face folder by the names potq's model uses (GPT-2's ``Conv1D``
    weights transposed to ``nn.Linear``'s ``[out, in]``), read one at a time as float32."""

    def __init__(self, folder: Path, original: nn.Module) -> None:
        from potq.models.hf import renaming, weight_files

        prefix, rename = f"{original.base_model_prefix}.", renaming(original)
        self.where: dict[str, tuple[Path, str]] = {}
        for file in weight_files(folder):
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    self.where[rename(key).removeprefix(prefix)] = (file, key)
        self.prefix = prefix
        self.conv1d = {name for name, m in original.named_modules() if type(m).__name__ == "Conv1D"}

    def read(self, name: str) -> Tensor:
        file, key = self.where[name.removeprefix(self.prefix)]
        with safe_open(str(file), framework="pt") as f:
            tensor = f.get_tensor(key).to(torch.float32)
        return tensor.t().contiguous() if name.rsplit(".", 1)[0] in self.conv1d else tensor


class LazyBlocks:
    """A model whose transformer blocks hold no weights until the block-wise engine reaches them.

    :func:`potq.engine.blocks.run_blockwise` calls :meth:`fill` before a block's turn and
    :meth:`release` after it: a data-dependent method (twostep, gptq, awq, …) then holds one
    float block at a time, the rest of the model (embeddings, norms, head) and what the method
    keeps of each finished block (its codes and scales, the block's small float tensors).
    """

    def __init__(self, model: nn.Module, tensors: HFTensors) -> None:
        from potq.models import transformer_blocks

        blocks = transformer_blocks(model)
        self.prefix = next(name for name, module in model.named_modules() if module is blocks)
        self.index = {id(block): i for i, block in enumerate(blocks)}
        self.tensors = tensors

    def fill(self, block: nn.Module) -> None:
        """Read every parameter of ``block`` that is not in memory from the files."""
        where = f"{self.prefix}.{self.index[id(block)]}"
        for name, parameter in list(block.named_parameters()):
            if parameter.is_meta:
                owner, _, leaf = name.rpartition(".")
                tensor = self.tensors.read(f"{where}.{name}")
                setattr(block.get_submodule(owner), leaf, nn.Parameter(tensor, requires_grad=False))

    def fill_outside(self, model: nn.Module, skip: nn.Module | None = None) -> None:
        """Read every parameter outside the blocks that is not in memory (but ``skip``'s)."""
        for name, parameter in list(model.named_parameters()):
            owner, _, leaf = name.rpartition(".")
            if name.startswith(f"{self.prefix}.") or not parameter.is_meta or model.get_submodule(owner) is skip:
                continue
            if name.removeprefix(self.tensors.prefix) in self.tensors.where:
                setattr(model.get_submodule(owner), leaf, nn.Parameter(self.tensors.read(name), requires_grad=False))
        model.tie_weights()  # a tied head is not in the files: it becomes the token table again
        missing = [name for name, parameter in model.named_parameters() if parameter.is_meta
                   and not name.startswith(f"{self.prefix}.") and model.get_submodule(name.rpartition(".")[0]) is not skip]
        if missing:  # check_weights compared the files with the model: only an untied copy can be left
            raise PotqError(f"{self.tensors.prefix}{missing[0]} is missing from the files; re-save the model")

    def finish(self, model: nn.Module) -> None:
        """Once every block is done: read what was left in the files (the output head)."""
        self.fill_outside(model)

    def release(self, block: nn.Module) -> None:
        """Drop the float weights of ``block``'s linears (their quantized form is the method's
        result); norms and biases stay, they are saved as they are."""
        for module in block.modules():
            if isinstance(module, nn.Linear):
                module.weight = nn.Parameter(torch.empty_like(module.weight, device="meta"), requires_grad=False)
        _return_free_memory()


def _return_free_memory() -> None:
    """Hand the block's freed pages back to the system (glibc keeps freed heap memory otherwise,
    and a long run's resident size creeps up block by block); a no-op where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def lazy_model(folder: Path) -> tuple[nn.Module, Any]:
    """The model of the Hugging Face ``folder`` with its blocks empty (see :class:`LazyBlocks`,
    attached as ``model.potq_lazy``) and everything else read; and its tokenizer."""
    from accelerate import init_empty_weights

    from potq.models import hf

    hf_config = hf.read_config(folder)
    hf.check_weights(folder, hf_config, hf.weight_files(folder), whole_model=False)
    tokenizer = hf.folder_tokenizer(folder, hf_config)
    with torch.device("meta"):
        original = hf.empty_model(hf_config, linear=False)
    with init_empty_weights():  # parameters on the meta device, buffers (rotary tables) real
        model = hf.empty_model(hf_config)
    lazy = LazyBlocks(model, HFTensors(folder, original))
    head = model.get_output_embeddings()
    untied = head is not None and head.weight is not model.get_input_embeddings().weight
    lazy.fill_outside(model, skip=head if untied else None)  # an untied head is not used until the end
    model.potq_lazy = lazy
    return model, tokenizer


def stream_quantize(folder: Path, config: QuantConfig, method: str, settings: dict[str, Any], out: Path,
                    source: dict, progress: bool = True, max_shard_bytes: int | None = None) -> Path:
    """Quantize the Hugging Face ``folder`` with ``method`` block by block into the potq folder
    ``out`` (checked free by the caller), never holding more than a block in float."""
    from potq import storage
    from potq.methods import get_method
    from potq.models import hf
    from potq.nn import QuantLinear
    from potq.outputs import publish, temp_folder
    from potq.quantize import quantizable_layers, recorded_settings

    hf_config = hf.read_config(folder)
    hf.check_weights(folder, hf_config, hf.weight_files(folder), whole_model=False)
    tokenizer = hf.folder_tokenizer(folder, hf_config)
    from potq.limits import check_vocabulary

    check_vocabulary(tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, hf_config.to_dict(), str(folder))
    with torch.device("meta"):
        original = hf.empty_model(hf_config, linear=False)
        model = hf.empty_model(hf_config)
    reader = HFTensors(folder, original)
    chosen = get_method(method)
    layers = quantizable_layers(model)
    fmt = config.make_format()
    with torch.device("meta"):
        for name, layer in layers.items():
            model.set_submodule(name, QuantLinear(layer.in_features, layer.out_features, fmt, config.group_size,
                                                  bias=layer.bias is not None))
    model.potq_meta = {**config.to_dict(), "embeddings": False, "method": method,  # quantize_'s order
                       "method_settings": recorded_settings(chosen.run, settings), "calibration": None}
    tensors, aliases = _plan(model)
    packed = {f"{name}.{part}" for name in layers for part in ("codes", "scales", "zeros", "bias")}

    read_float = reader.read
    dtypes = {name: storage.narrowest_exact(read_float(name)).dtype for name in tensors if name not in packed}
    entries = [(name, storage.SAFETENSORS_DTYPES[dtypes.get(name, t.dtype)], tuple(t.shape),
                t.numel() * (dtypes.get(name, t.dtype)).itemsize) for name, t in tensors.items()]
    tmp = temp_folder(out)
    try:
        manifest = storage.write_description(tmp, model, tokenizer, source, aliases)
        metadata = storage.weights_metadata(manifest, PLACEHOLDER)
        shards = storage.shard_plan([(e[0], e[3]) for e in entries], max_shard_bytes or storage.MAX_SHARD_BYTES)
        file_of = {name: file for file, names in shards.items() for name in names}
        writers = {file: storage.SafetensorsWriter(tmp / file, [e for e in entries if file_of[e[0]] == file], metadata)
                   for file in shards}
        writer_of = {name: writers[file] for name, file in file_of.items()}
        storage.write_index(tmp, shards, {e[0]: e[3] for e in entries})
        digests: dict[str, str] = {}
        by_layer = {name: [t for t in tensors if t.rsplit(".", 1)[0] == name] for name in layers}
        run = lambda linears: chosen.run(None, linears, config, **{**settings, "progress": False})  # noqa: E731
        for name, tensor in _tensors_in_order(tensors, layers, by_layer, read_float, run, fmt, progress):
            tensor = tensor if name in packed else storage.narrowest_exact(tensor)
            digests[name] = storage.tensor_digest(name, tensor)
            writer_of[name].write(name, tensor)
        for writer in writers.values():
            writer.close({PLACEHOLDER: storage.combine_digests(digests)})
        (tmp / storage.MANIFEST_FILE).write_bytes(manifest)
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already once published
    return out


def _plan(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors to store (meta tensors, in state-dict order) and the aliases of tied ones."""
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[int, str] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in seen:
            aliases[name] = seen[id(parameter)]
        seen.setdefault(id(parameter), name)
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name not in aliases:
            tensors[name] = tensor
    return tensors, aliases


def _tensors_in_order(tensors: dict[str, Tensor], layers: dict[str, nn.Module], by_layer: dict[str, list[str]],
                      read_float: Any, run: Any, fmt: Any, progress: bool) -> Iterator[tuple[str, Tensor]]:
    """Every stored tensor in ``tensors``' order: a packed layer's tensors made by the method from
    the layer's float weight, read when the layer's first tensor comes; float tensors as read."""
    from potq.nn import QuantLinear

    made: dict[str, Tensor] = {}
    owner = {t: layer for layer, names in by_layer.items() for t in names}
    bar = tqdm(total=len(layers), desc=f"stream {fmt!r}", unit="layer", disable=not progress)
    for name in tensors:
        layer = owner.get(name)
        if layer is None:
            yield name, read_float(name)
            continue
        if name not in made:
            weight = read_float(f"{layer}.weight")
            bias = read_float(f"{layer}.bias") if tensors.get(f"{layer}.bias") is not None else None
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
            linear.weight = nn.Parameter(weight, requires_grad=False)
            if bias is not None:
                linear.bias = nn.Parameter(bias, requires_grad=False)
            qw = run({layer: linear})[layer]
            made.update({f"{layer}.{k}": v for k, v in QuantLinear.from_quantized(qw, bias).state_dict().items()
                         if v is not None})
            bar.update(1)
        yield name, made.pop(name)
    bar.close()
