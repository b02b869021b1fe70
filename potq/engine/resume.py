"""Resuming a block-wise run: a run killed at any moment continues from its last finished block.

While a checkpoint is active (:func:`checkpointing`, which ``potq quantize`` opens beside its
output), :func:`potq.engine.blocks.run_blockwise` saves after every block, atomically: the block's
weights (everything its method changed, folded norms included), the quantized weights the method
committed for it, the calibration activations entering the next block, and the random state. Run
again with the same model, method, settings and calibration (checked by a fingerprint), the engine
restores the finished blocks and goes on from the first unfinished one, so the run ends with the
same bytes as one that was never interrupted. A checkpoint that does not match is discarded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from potq.formats import get_format
from potq.formats.weights import QuantizedWeight

META_FILE = "resume.json"


class Checkpoint:
    """One run's checkpoint folder."""

    def __init__(self, folder: Path, fingerprint: str) -> None:
        self.folder, self.fingerprint = folder, fingerprint
        self.pending: dict[str, QuantizedWeight] = {}  # restored entries the next commit files in the result
        self.committed: dict[str, QuantizedWeight] = {}  # this block's entries, saved with it
        meta = self._meta()
        if meta.get("fingerprint") != fingerprint:
            shutil.rmtree(folder, ignore_errors=True)
            meta = {}
        self.done = int(meta.get("done", 0))

    def _meta(self) -> dict:
        try:
            return json.loads((self.folder / META_FILE).read_text())
        except (OSError, ValueError):
            return {}

    def save(self, index: int, block: nn.Module, inputs: list[Tensor], float_inputs: list[Tensor] | None) -> None:
        """Block ``index`` is finished: keep it, what it committed, and the next block's inputs."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"block.{k}": v.detach().contiguous() for k, v in block.state_dict().items()}
        for name, qw in self.committed.items():
            tensors[f"qw.{name}.codes"] = qw.codes.contiguous()
            tensors[f"qw.{name}.scale"] = qw.scale.contiguous()
            if qw.zero is not None:
                tensors[f"qw.{name}.zero"] = qw.zero.contiguous()
        formats = {name: [qw.fmt.name, qw.fmt.bits, qw.group_size] for name, qw in self.committed.items()}
        self._write(f"block-{index}.safetensors", tensors, {"formats": json.dumps(formats)})
        streams = {f"in.{i}": x.contiguous() for i, x in enumerate(inputs)}
        streams.update({f"float.{i}": x.contiguous() for i, x in enumerate(float_inputs or [])})
        streams["rng"] = torch.get_rng_state()
        self._write("inputs.safetensors", streams, {})
        self.done = index + 1
        tmp = self.folder / f".{META_FILE}.tmp"
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "done": self.done}))
        os.replace(tmp, self.folder / META_FILE)
        self.committed = {}

    def _write(self, name: str, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
        tmp = self.folder / f".{name}.tmp"
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, self.folder / name)

    def restore(self, blocks: nn.ModuleList, assign: bool = False) -> tuple[list[Tensor], list[Tensor] | None] | None:
        """Put the finished blocks back (``assign``: as new tensors, for blocks that hold none); the
        inputs of the first unfinished one (None: nothing done)."""
        if self.done == 0:
            return None
        for index in range(self.done):
            path = self.folder / f"block-{index}.safetensors"
            tensors = load_file(str(path))
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                formats = json.loads(f.metadata()["formats"])
            blocks[index].load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("block.")},
                                          assign=assign)
            for name, (fmt, bits, group) in formats.items():
                self.pending[name] = QuantizedWeight(get_format(fmt, bits), group, tensors[f"qw.{name}.codes"],
                                                     tensors[f"qw.{name}.scale"], tensors.get(f"qw.{name}.zero"))
        streams = load_file(str(self.folder / "inputs.safetensors"))
        torch.set_rng_state(streams["rng"])
        inputs = [streams[f"in.{i}"] for i in range(sum(k.startswith("in.") for k in streams))]
        floats = [streams[f"float.{i}"] for i in range(sum(k.startswith("float.") for k in streams))]
        return inputs, floats or None


_active: Checkpoint | None = None


def active() -> Checkpoint | None:
    return _active


@contextmanager
def checkpointing(folder: str | os.PathLike | None, *parts: object) -> Iterator[Checkpoint | None]:
    """Within the block, block-wise runs checkpoint into ``folder`` (None: no checkpoint), under
    a fingerprint of ``parts`` (tensors by their bytes, the rest by their JSON)."""
    global _active
    if folder is None:
        yield None
        return
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, Tensor):
            digest.update(part.contiguous().reshape(-1).view(torch.uint8).numpy())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    saved, _active = _active, Checkpoint(Path(folder), digest.hexdigest())
    try:
        yield _active
    finally:
        _active = saved
