"""The potq file format: one folder per quantized model (documented in docs/format.md).

``model.safetensors``  the model's state dict: per quantized linear ``<name>.codes`` (uint8,
                       bit-packed rows), ``<name>.scales`` (fp16 [out, groups]), ``<name>.zeros``
                       (uint8, affine formats only); every other tensor as it is. A tensor that
                       shares storage with an earlier one (tied embeddings) is stored once.
``potq.json``          what the tensors mean: potq version, format, bits, group size, method and
                       its settings, source model and its sha256, architecture, per-layer table.
``tokenizer.json``     the tokenizer, so loading never needs the source model.

Saving writes a temporary sibling folder and renames it into place: an interrupted save never
leaves a half-written folder under the final name. Loading checks every tensor's shape and dtype
in the safetensors header against ``potq.json`` before it allocates the model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from potq import __version__
from potq.errors import PotqError
from potq.formats import get_format
from potq.formats.grouping import num_groups
from potq.formats.packing import packed_row_bytes
from potq.models import LoadedModel, architecture, build_model
from potq.models.tokenizer import Tokenizer
from potq.nn import PackedWeight, QuantEmbedding, QuantLinear

WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "potq.json"
FILE_FORMAT_VERSION = 1


# --- saving -----------------------------------------------------------------------------------
def save(model: nn.Module | LoadedModel, path: str | os.PathLike, tokenizer: Tokenizer | None = None,
         source: dict | None = None) -> Path:
    """Write ``model`` (quantized or not) with its tokenizer to the folder ``path``."""
    if isinstance(model, LoadedModel):
        tokenizer, source, model = tokenizer or model.tokenizer, source or model.source, model.model
    if tokenizer is None:
        raise PotqError("potq.save needs the tokenizer: pass tokenizer=... or a LoadedModel")
    out = Path(path)
    if out.exists() and not (out / MANIFEST_FILE).is_file():
        raise PotqError(f"{out} exists and is not a potq model folder: choose another output path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors, aliases = _dedup_state_dict(model)
    manifest = _manifest(model, source or {}, aliases)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"potq": __version__})
        tokenizer.save(tmp)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _dedup_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Contiguous copies of every tensor, storing a tensor that aliases an earlier one once."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple], str] = {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            tensors[name] = t.detach().contiguous()
    return tensors, aliases


def _manifest(model: nn.Module, source: dict, aliases: dict[str, str]) -> dict[str, Any]:
    meta = getattr(model, "potq_meta", None) or {"format": None, "bits": None, "group_size": None,
                                                "method": None, "method_settings": {}}
    layers = _layer_entries(model)
    return {
        "file_format_version": FILE_FORMAT_VERSION,
        "potq_version": __version__,
        **meta,
        "source": source,
        "architecture": architecture(model),
        "aliases": aliases,
        "quantized_layers": layers,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _layer_entries(model: nn.Module) -> dict[str, dict[str, Any]]:
    """One entry per packed layer; a layer sharing another's codes (a tied head) names it."""
    owners: dict[int, str] = {}
    entries = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, PackedWeight):
            continue
        entry = {"kind": layer.kind, "in_features": layer.in_features, "out_features": layer.out_features,
                 "format": layer.fmt.name, "bits": layer.fmt.bits, "group_size": layer.group_size,
                 "bias": getattr(layer, "bias", None) is not None}
        owner = owners.setdefault(id(layer.codes), name)
        if owner != name:
            entry["shares"] = owner
        entries[name] = entry
    return entries


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move ``tmp`` to ``out``; an old ``out`` is moved aside first and removed only after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --- loading ----------------------------------------------------------------------------------
def is_potq_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST_FILE).is_file()


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    folder = Path(path)
    if not (folder / MANIFEST_FILE).is_file():
        raise PotqError(f"{folder} is not a potq model folder (no {MANIFEST_FILE}): run `potq quantize` first")
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise PotqError(f"{folder / MANIFEST_FILE} is corrupt ({exc}): quantize the model again") from None
    version = manifest.get("file_format_version")
    if version != FILE_FORMAT_VERSION:
        raise PotqError(f"{folder} has file format version {version!r}; this potq reads "
                        f"{FILE_FORMAT_VERSION}: re-quantize or upgrade potq")
    return manifest


def header_shapes(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, dtype)}`` from the safetensors header, without reading any tensor."""
    weights = Path(path) / WEIGHTS_FILE
    try:
        with safe_open(str(weights), framework="pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise PotqError(f"{weights} is missing or corrupt ({exc}): quantize the model again") from None


def expected_layer_tensors(name: str, entry: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shapes and dtypes the file must hold for one quantized layer of ``potq.json``."""
    fmt = get_format(entry["format"], entry["bits"])
    rows, cols, group = entry["out_features"], entry["in_features"], entry["group_size"]
    expected = {}
    if not entry.get("shares"):  # a tied head's codes are its table's
        expected[f"{name}.codes"] = ((rows, packed_row_bytes(cols, fmt.bits)), "U8")
        expected[f"{name}.scales"] = ((rows, num_groups(cols, group)), "F16")
        if fmt.has_zero:
            expected[f"{name}.zeros"] = ((rows, num_groups(cols, group)), "U8")
    if entry.get("bias"):
        expected[f"{name}.bias"] = ((rows,), "F32")
    return expected


def load(path: str | os.PathLike) -> LoadedModel:
    """Rebuild a saved model: same architecture, the same packed layers, the same tokenizer."""
    folder = Path(path)
    manifest = read_manifest(folder)
    header = header_shapes(folder)
    try:
        for name, entry in manifest["quantized_layers"].items():
            for key, want in expected_layer_tensors(name, entry).items():
                if header.get(key) != want:
                    raise PotqError(f"{folder / WEIGHTS_FILE}: tensor {key} is {header.get(key)}, "
                                    f"expected {want}: the file is corrupt, quantize the model again")
        model = build_model(manifest["architecture"])
        for name, entry in manifest["quantized_layers"].items():
            model.set_submodule(name, _packed_layer(entry))
        for name, entry in manifest["quantized_layers"].items():
            if entry.get("shares"):
                model.get_submodule(name).share_from(model.get_submodule(entry["shares"]))
    except (KeyError, TypeError, AttributeError) as exc:
        raise PotqError(f"{folder / MANIFEST_FILE} is incomplete or malformed ({exc}): quantize again") from None
    _check_against_model(model, header, manifest.get("aliases", {}), folder)
    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    model.load_state_dict(state, strict=False)
    model.eval()
    model.potq_meta = {k: manifest.get(k) for k in ("format", "bits", "group_size", "options", "method",
                                                     "method_settings", "calibration")}
    source = {**manifest.get("source", {}), "quantized": str(folder.resolve())}
    return LoadedModel(model, Tokenizer.load(folder), source)


def _packed_layer(entry: dict[str, Any]) -> PackedWeight:
    """An empty packed layer of the kind and shape a ``quantized_layers`` entry describes."""
    fmt = get_format(entry["format"], entry["bits"])
    if entry.get("kind", "linear") == "embedding":
        return QuantEmbedding(entry["in_features"], entry["out_features"], fmt, entry["group_size"])
    return QuantLinear(entry["in_features"], entry["out_features"], fmt, entry["group_size"], bias=entry["bias"])


def _check_against_model(model: nn.Module, header: dict, aliases: dict[str, str], folder: Path) -> None:
    expected = model.state_dict()
    missing = set(expected) - set(header) - set(aliases)
    unexpected = set(header) - set(expected)
    if missing or unexpected:
        what = f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(unexpected)[:3]}"
        raise PotqError(f"{folder / WEIGHTS_FILE} does not match its potq.json ({what}): quantize again")
    for key, (shape, _) in header.items():
        if tuple(expected[key].shape) != shape:
            raise PotqError(f"{folder / WEIGHTS_FILE}: tensor {key} has shape {shape}, the model "
                            f"expects {tuple(expected[key].shape)}: quantize the model again")
