"""Quantizing a model larger than memory: one block at a time, from memory-mapped safetensors.

For a Hugging Face folder and a method that quantizes each layer on its own (``rtn``, ``grid``
with its plain weight objective), the whole float model never exists:

1. the architecture is built on the meta device (no memory) and checked against the files;
2. each tensor is read from its memory-mapped shard when its turn comes — a block's linears,
   quantized by the method's own code, then dropped; the float tensors outside the blocks
   (embeddings, norms, head) one at a time;
3. the packed result is written as it is made (:class:`potq.storage.SafetensorsWriter`: the header, with every
   offset, first; the content checksum filled in at the end), in shards with an index when it is
   larger than :data:`potq.storage.MAX_SHARD_BYTES`.

Peak memory is about one block in float32 plus one float tensor, whatever the number of blocks.
The folder is the same as :func:`potq.quantize_` + :func:`potq.save` write in memory — the same
tensors, byte for byte, and the same ``potq.json`` but its time stamp (tested).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from potq.config import QuantConfig
from potq.models.lazy import HFTensors

PLACEHOLDER = "0" * 64


def streams(method: str, settings: dict[str, Any], embeddings: bool) -> bool:
    """Whether ``method`` quantizes each layer on its own, with no data, so it can stream."""
    return not embeddings and (method == "rtn" or method == "grid" and settings.get("objective", "mse") == "mse")


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
