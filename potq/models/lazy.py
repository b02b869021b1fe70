"""Models whose transformer blocks stay in their files until the block-wise engine reads them.

``potq.load_model(path, lazy=True)`` builds the model with its block parameters on the meta
device (buffers such as rotary tables real) and everything outside the blocks read — the output
head, when untied, only at the end. :class:`LazyBlocks` (attached as ``model.potq_lazy``) then
fills a block from the files before its turn in :func:`potq.engine.blocks.run_blockwise` and
drops its linears' float weights after, so a data-dependent method holds one float block at a
time. The files are read one tensor at a time through a reader: :class:`HFTensors` for
safetensors shards, :class:`potq.models.gguf.GGUFTensors` for a llama GGUF (dequantized on demand).
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from torch import Tensor, nn

from potq.errors import PotqError


class TensorReader(Protocol):
    """Where a model's tensors live: ``where`` holds each stored name (without ``prefix``)."""

    prefix: str
    where: dict[str, Any]

    def read(self, name: str) -> Tensor: ...


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

    def __init__(self, model: nn.Module, tensors: TensorReader) -> None:
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
        if self._missing(model, None):  # a tied head is not in the files: it becomes the token table again
            model.tie_weights()  # (only while unfilled: once the table is packed, the head shares its codes)
        missing = self._missing(model, skip)
        if missing:  # check_weights compared the files with the model: only an untied copy can be left
            raise PotqError(f"{self.tensors.prefix}{missing[0]} is missing from the files; re-save the model")

    def _missing(self, model: nn.Module, skip: nn.Module | None) -> list[str]:
        """The parameters outside the blocks (but ``skip``'s) still without values."""
        return [name for name, parameter in model.named_parameters() if parameter.is_meta
                and not name.startswith(f"{self.prefix}.") and model.get_submodule(name.rpartition(".")[0]) is not skip]

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


def hf_lazy_model(folder: Path) -> tuple[nn.Module, Any]:
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
    return attach(model, HFTensors(folder, original)), tokenizer


def attach(model: nn.Module, tensors: TensorReader) -> nn.Module:
    """``model`` (parameters on the meta device) with everything outside its blocks read from
    ``tensors`` and :class:`LazyBlocks` attached for the blocks."""
    lazy = LazyBlocks(model, tensors)
    head = model.get_output_embeddings()
    untied = head is not None and head.weight is not model.get_input_embeddings().weight
    lazy.fill_outside(model, skip=head if untied else None)  # an untied head is not used until the end
    model.potq_lazy = lazy
    return model
