"""Quantizing a model larger than memory: one block at a time, from memory-mapped safetensors.

For a Hugging Face folder and a method that quantizes each layer on its own (``rtn``, ``grid``
with its plain weight objective), the whole float model never exists:

1. the architecture is built on the meta device (no memory) and checked against the files;
2. each tensor is read from its memory-mapped shard when its turn comes — a block's linears,
   quantized by the method's own code, then dropped; the float tensors outside the blocks
   (embeddings, norms, head) one at a time;
3. the packed result is written as it is made (:class:`SafetensorsWriter`: the header, with every
   offset, first; the content checksum filled in at the end).

Peak memory is about one block in float32 plus one float tensor, whatever the number of blocks.
The folder is the same as :func:`potq.quantize_` + :func:`potq.save` write in memory — the same
tensors, byte for byte, and the same ``potq.json`` but its time stamp (tested).
"""

from __future__ import annotations

import json
import shutil
import struct
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


class SafetensorsWriter:
    """Writes a safetensors file tensor by tensor in a fixed order: the header (names, dtypes,
    shapes, offsets, metadata) first, each tensor's bytes as it comes, and at :meth:`close` the
    metadata values that were placeholders (a checksum known only at the end)."""

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...], int]],
                 metadata: dict[str, str]) -> None:
        header: dict[str, Any] = {"__metadata__": metadata}
        offset = 0
        for name, dtype, shape, nbytes in entries:
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.header, self.order, self.stream = raw, [e[0] for e in entries], path.open("wb")
        self.sizes = {name: nbytes for name, _, _, nbytes in entries}
        self.stream.write(struct.pack("<Q", len(raw)) + raw)
        self.next = 0

    def write(self, name: str, tensor: Tensor) -> None:
        if self.order[self.next] != name:
            raise RuntimeError(f"expected tensor {self.order[self.next]}, got {name}")
        data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
        if data.nbytes != self.sizes[name]:
            raise RuntimeError(f"{name}: {data.nbytes} bytes, the header says {self.sizes[name]}")
        self.stream.write(data.tobytes())
        self.next += 1

    def close(self, fill: dict[str, str]) -> None:
        """Replace each placeholder (of the same length as its value) in the header."""
        header = self.header
        for placeholder, value in fill.items():
            if len(placeholder) != len(value) or header.count(placeholder.encode()) != 1:
                raise RuntimeError("a metadata placeholder must be unique and as long as its value")
            header = header.replace(placeholder.encode(), value.encode())
        self.stream.seek(8)
        self.stream.write(header)
        self.stream.close()


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

    def release(self, block: nn.Module) -> None:
        """Drop the float weights of ``block``'s linears (their quantized form is the method's
        result); norms and biases stay, they are saved as they are."""
        for module in block.modules():
            if isinstance(module, nn.Linear):
                module.weight = nn.Parameter(torch.empty_like(module.weight, device="meta"), requires_grad=False)


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
    outside = lambda: [(n, p) for n, p in model.named_parameters() if not n.startswith(f"{lazy.prefix}.")]  # noqa: E731
    for name, parameter in outside():
        if name.removeprefix(lazy.tensors.prefix) in lazy.tensors.where:
            owner, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner), leaf, nn.Parameter(lazy.tensors.read(name), requires_grad=False))
    model.tie_weights()  # a tied head is not in the files: it becomes the token table again
    missing = [name for name, parameter in outside() if parameter.is_meta]
    if missing:  # check_weights compared the files with the model: only an untied copy can be left
        raise PotqError(f"{folder} lacks {missing[0]}; re-save the model")
    model.potq_lazy = lazy
    return model, tokenizer


def stream_quantize(folder: Path, config: QuantConfig, method: str, settings: dict[str, Any], out: Path,
                    source: dict, progress: bool = True) -> Path:
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
        writer = SafetensorsWriter(tmp / storage.WEIGHTS_FILE, entries, storage.weights_metadata(manifest, PLACEHOLDER))
        digests: dict[str, str] = {}
        by_layer = {name: [t for t in tensors if t.rsplit(".", 1)[0] == name] for name in layers}
        run = lambda linears: chosen.run(None, linears, config, progress=False, **settings)  # noqa: E731
        for name, tensor in _tensors_in_order(tensors, layers, by_layer, read_float, run, fmt, progress):
            tensor = tensor if name in packed else storage.narrowest_exact(tensor)
            digests[name] = storage.tensor_digest(name, tensor)
            writer.write(name, tensor)
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
