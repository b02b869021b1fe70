"""The potq file format: one folder per quantized model (documented in docs/format.md).

``model.safetensors``  the model's state dict (a model over :data:`MAX_SHARD_BYTES`: shards
                       ``model-00001-of-0000N.safetensors`` and ``model.safetensors.index.json``,
                       as transformers writes them): per quantized linear ``<name>.codes`` (uint8,
                       bit-packed rows), ``<name>.scales`` (fp16 [out, groups]), ``<name>.zeros``
                       (uint8, affine formats only); every other tensor as it is. A tensor that
                       shares storage with an earlier one (tied embeddings) is stored once. Its
                       metadata ties it to its description: the sha256 of ``potq.json``, each
                       tensor's role, and a checksum of every tensor's bytes.
``potq.json``          what the tensors mean: potq version, format, bits, group size, method and
                       its settings, source model and its sha256, architecture, per-layer table.
``tokenizer.json``     the tokenizer, so loading never needs the source model.

A folder is data from whoever handed it over, so :func:`inspect` checks it — the manifest's
schema and limits, the digests, every tensor's name, shape and dtype against the model the
manifest describes (built on the meta device, no memory) — before :func:`load` allocates
anything, and the tensor bytes are checked against their checksum as they are read. Saving goes
through :mod:`potq.outputs`: a temporary sibling, swapped in atomically, never over a user's files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from potq import __version__, interop
from potq.errors import PotqError, first_line
from potq.formats import FORMATS, get_format
from potq.formats.grouping import num_groups
from potq.formats.packing import packed_row_bytes
from potq.limits import (MAX_TOKENIZER_BYTES, MAX_VOCAB, check_config, check_memory, check_vocabulary,
                         load_json_object, read_small_file, whole_number)
from potq.models.tokenizer import SPECIALS_FILE, TOKENIZER_FILE, Tokenizer
from potq.nn import PackedWeight, QuantEmbedding, QuantLinear
from potq.outputs import check_output, publish, temp_folder

if TYPE_CHECKING:
    from potq.models import LoadedModel

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_NAME = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")
MAX_SHARD_BYTES = 5 * 10**9  # 5 GB, the Hub's habit: a file per few GB
MANIFEST_FILE = "potq.json"


class _FolderFiles(frozenset):
    """The names of the files a potq folder holds (shards by their pattern)."""

    def __contains__(self, name: object) -> bool:
        return super().__contains__(name) or isinstance(name, str) and SHARD_NAME.fullmatch(name) is not None


FOLDER_FILES = _FolderFiles((WEIGHTS_FILE, INDEX_FILE, MANIFEST_FILE, TOKENIZER_FILE, SPECIALS_FILE,
                             interop.CONFIG_FILE, interop.TOKENIZER_CONFIG_FILE))
DIGESTED_FILES = (TOKENIZER_FILE, SPECIALS_FILE, interop.CONFIG_FILE, interop.TOKENIZER_CONFIG_FILE)
FILE_FORMAT_VERSION = 2  # 2: safetensors metadata digests (potq.json, roles, content)
FLOAT_DTYPES = ("F32", "F16", "BF16")
# safetensors metadata keys
META_MANIFEST, META_ROLES, META_CONTENT = "potq_json_sha256", "potq_roles", "potq_content_sha256"


# --- saving -----------------------------------------------------------------------------------
def save(model: nn.Module | LoadedModel, path: str | os.PathLike, tokenizer: Tokenizer | None = None,
         source: dict | None = None, overwrite: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write ``model`` (quantized or not) with its tokenizer to the folder ``path``; weights over
    ``max_shard_bytes`` go into shards with an index (each shard carries the same metadata).

    An existing ``path`` is replaced only with ``overwrite=True`` and only when it is a potq
    folder holding nothing but potq's files (see :mod:`potq.outputs`).
    """
    from potq.models import LoadedModel

    if isinstance(model, LoadedModel):
        tokenizer, source, model = tokenizer or model.tokenizer, source or model.source, model.model
    if tokenizer is None:
        raise PotqError("potq.save needs the tokenizer: pass tokenizer=... or a LoadedModel")
    out = Path(path)
    check_output(out, overwrite, MANIFEST_FILE, FOLDER_FILES)
    tensors, aliases = _dedup_state_dict(model)
    tmp = temp_folder(out)
    try:
        manifest = write_description(tmp, model, tokenizer, source or {}, aliases)
        metadata = weights_metadata(manifest, content_digest(sorted(tensors.items())))
        sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
        shards = shard_plan(list(sizes.items()), max_shard_bytes)
        for file, names in shards.items():  # tensor by tensor: never the whole file's bytes in memory
            writer = SafetensorsWriter(tmp / file, [(n, SAFETENSORS_DTYPES[tensors[n].dtype], tuple(tensors[n].shape),
                                                     sizes[n]) for n in names], metadata)
            for name in names:
                writer.write(name, tensors[name])
            writer.close({})
        write_index(tmp, shards, sizes)
        (tmp / MANIFEST_FILE).write_bytes(manifest)
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already once published
    return out


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

    def write(self, name: str, tensor: torch.Tensor) -> None:
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


def shard_plan(sizes: list[tuple[str, int]], max_shard_bytes: int) -> dict[str, list[str]]:
    """``{file: tensor names}``: one ``model.safetensors``, or consecutive runs of tensors of at most
    ``max_shard_bytes`` each (a bigger tensor alone) as numbered shards."""
    groups: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if groups[-1] and used + nbytes > max_shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += nbytes
    if len(groups) == 1:
        return {WEIGHTS_FILE: groups[0]}
    return {f"model-{i:05d}-of-{len(groups):05d}.safetensors": names for i, names in enumerate(groups, 1)}


def write_index(folder: Path, shards: dict[str, list[str]], sizes: dict[str, int]) -> None:
    """``model.safetensors.index.json`` for a sharded save (nothing for one file)."""
    if list(shards) != [WEIGHTS_FILE]:
        index = {"metadata": {"total_size": sum(sizes.values())},
                 "weight_map": {name: file for file, names in shards.items() for name in names}}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=1))


def write_description(folder: Path, model: nn.Module, tokenizer: Tokenizer, source: dict,
                      aliases: dict[str, str]) -> bytes:
    """Write the tokenizer, ``config.json`` and ``tokenizer_config.json`` into ``folder``; return the
    bytes of ``potq.json`` describing ``model`` (written last by the caller, after the weights)."""
    tokenizer.save(folder)
    description = _manifest(model, source, aliases, {})
    (folder / interop.CONFIG_FILE).write_text(json.dumps(interop.folder_config(description), indent=1))
    specials = (None if i is None else tokenizer.backend.id_to_token(i) for i in (tokenizer.bos_id, tokenizer.eos_id))
    (folder / interop.TOKENIZER_CONFIG_FILE).write_text(json.dumps(interop.tokenizer_config(*specials,
                                                                                         tokenizer.chat_template)))
    description["files"] = {name: _file_digest(folder / name) for name in DIGESTED_FILES}
    return json.dumps(description, indent=1).encode()


def weights_metadata(manifest: bytes, content: str) -> dict[str, str]:
    """The safetensors metadata that ties the weights to ``manifest`` (see docs/format.md)."""
    return {"potq": __version__, META_MANIFEST: hashlib.sha256(manifest).hexdigest(),
            META_ROLES: json.dumps(tensor_roles(json.loads(manifest)), sort_keys=True), META_CONTENT: content}


def _dedup_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Contiguous copies of every tensor, storing a tensor that aliases an earlier one once, and a
    float tensor outside the packed layers in the narrowest float type that holds it exactly."""
    packed = {f"{name}.{part}" for name, m in model.named_modules() if isinstance(m, PackedWeight)
              for part in ("codes", "scales", "zeros", "bias")}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple], str] = {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            tensors[name] = t.detach().contiguous() if name in packed else narrowest_exact(t.detach().contiguous())
    return tensors, aliases


def narrowest_exact(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as bf16 or fp16 where that holds every value exactly, else unchanged: a model
    that came as bf16 (or fp16) keeps its embeddings and norms at that size on disk — never
    inflated to the float32 potq computes in — and nothing is rounded."""
    if tensor.dtype != torch.float32:
        return tensor
    for dtype in (torch.bfloat16, torch.float16):
        narrow = tensor.to(dtype)
        if torch.equal(narrow.to(torch.float32), tensor):
            return narrow
    return tensor


def _file_digest(path: Path) -> str:
    return hashlib.sha256(read_small_file(path, "a file of the folder", MAX_TOKENIZER_BYTES)).hexdigest()


def _manifest(model: nn.Module, source: dict, aliases: dict[str, str], files: dict[str, str]) -> dict[str, Any]:
    from potq.models import architecture

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
        "files": files,
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


def tensor_roles(manifest: dict[str, Any]) -> dict[str, str]:
    """``{tensor: role}`` for every packed layer's tensors (``codes``, ``scales``, ``zeros``,
    ``bias``): what the manifest says each stored tensor is, recorded beside the tensors."""
    roles = {}
    for name, entry in manifest["quantized_layers"].items():
        for key in expected_layer_tensors(name, entry):
            roles[key] = key.rsplit(".", 1)[1]
    return roles


def tensor_digest(name: str, tensor: torch.Tensor) -> str:
    """sha256 of one tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def combine_digests(digests: dict[str, str]) -> str:
    """One digest over per-tensor digests in name order: the same whatever order the tensors were
    written or read in (a streamed save writes them block by block)."""
    return hashlib.sha256("".join(f"{name}:{digests[name]}\n" for name in sorted(digests)).encode()).hexdigest()


def content_digest(tensors: Iterator[tuple[str, torch.Tensor]] | list[tuple[str, torch.Tensor]]) -> str:
    """The checksum of every stored tensor (see :func:`combine_digests`)."""
    return combine_digests({name: tensor_digest(name, tensor) for name, tensor in tensors})


# --- checking ---------------------------------------------------------------------------------
def is_potq_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST_FILE).is_file()


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """``potq.json``, its schema checked (types, ranges, known formats, architecture limits)."""
    return _read_manifest(Path(path))[0]


def _read_manifest(folder: Path) -> tuple[dict[str, Any], bytes]:
    if not (folder / MANIFEST_FILE).is_file():
        raise PotqError(f"{folder} is not a potq model folder (no {MANIFEST_FILE}): run `potq quantize` first")
    raw = read_small_file(folder / MANIFEST_FILE, "the manifest")
    manifest = load_json_object(raw, str(folder / MANIFEST_FILE))
    version = manifest.get("file_format_version")
    if version != FILE_FORMAT_VERSION:
        raise PotqError(f"{folder} has file format version {version!r}; this potq reads "
                        f"{FILE_FORMAT_VERSION}: quantize the model again with this potq")
    _check_schema(manifest, str(folder / MANIFEST_FILE))
    return manifest, raw


def _check_schema(manifest: dict[str, Any], what: str) -> None:
    """Every field potq acts on has the type and range it must have."""
    def need(value: Any, kind: type | tuple[type, ...], name: str) -> Any:
        if not isinstance(value, kind):
            raise PotqError(f"{what}: {name} is a {type(value).__name__}, not what potq writes; it is corrupt")
        return value

    arch = need(manifest.get("architecture"), dict, "architecture")
    check_config(need(arch.get("config"), dict, "architecture.config"), what)
    for key in ("source", "method_settings", "options", "calibration"):
        if manifest.get(key) is not None:
            need(manifest[key], dict, key)
    for key in ("format", "method"):
        if manifest.get(key) is not None:
            need(manifest[key], str, key)
    for name, target in need(manifest.get("aliases", {}), dict, "aliases").items():
        need(target, str, f"aliases[{name!r}]")
    layers = need(manifest.get("quantized_layers"), dict, "quantized_layers")
    for name, entry in layers.items():
        need(entry, dict, f"quantized_layers[{name!r}]")
        where = f"{what}: layer {name}"
        if entry.get("kind", "linear") not in ("linear", "embedding"):
            raise PotqError(f"{where}: kind {entry.get('kind')!r} is not linear or embedding; it is corrupt")
        if not isinstance(entry.get("format"), str) or entry["format"] not in FORMATS:
            raise PotqError(f"{where}: format {entry.get('format')!r} is not one potq writes; it is corrupt")
        whole_number(entry.get("bits"), "bits", 1, 16, where)
        get_format(entry["format"], entry["bits"])  # the format's own range of bits
        whole_number(entry.get("in_features"), "in_features", 1, MAX_VOCAB, where)
        whole_number(entry.get("out_features"), "out_features", 1, MAX_VOCAB, where)
        whole_number(entry.get("group_size"), "group_size", -1, MAX_VOCAB, where)
        need(entry.get("bias", False), bool, f"quantized_layers[{name!r}].bias")
        owner = entry.get("shares")
        if owner is not None and (not isinstance(owner, str) or owner not in layers or layers[owner].get("shares")
                                  or layers[owner].get("format") != entry["format"]
                                  or layers[owner].get("bits") != entry["bits"]):
            raise PotqError(f"{where}: shares {owner!r}, which is not a layer of the same format; it is corrupt")


@dataclass
class Checked:
    """A folder whose description and tensor header agree (see :func:`inspect`)."""

    folder: Path
    manifest: dict[str, Any]
    header: dict[str, tuple[tuple[int, ...], str]]
    metadata: dict[str, str]
    files: list[Path]

    @property
    def weights(self) -> Path:
        """The weights as a person names them: the file, or the index of the shards."""
        return self.folder / (WEIGHTS_FILE if self.files == [self.folder / WEIGHTS_FILE] else INDEX_FILE)


def weight_files(folder: Path) -> list[Path]:
    """``model.safetensors``, or the shards the index names — numbered 1..N of N, in the folder
    (the index is data: no other name, hence no other path, is accepted)."""
    if not (folder / INDEX_FILE).exists():
        return [folder / WEIGHTS_FILE]
    index = load_json_object(read_small_file(folder / INDEX_FILE, "the shard index"), str(folder / INDEX_FILE))
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise PotqError(f"{folder / INDEX_FILE} has no weight_map; it is corrupt")
    names = sorted(set(map(str, weight_map.values())))
    matches = [SHARD_NAME.fullmatch(name) for name in names]
    if not all(matches) or [(int(m[1]), int(m[2])) for m in matches] != [(i, len(names)) for i in
                                                                          range(1, len(names) + 1)]:
        raise PotqError(f"{folder / INDEX_FILE} names shards other than model-00001-of-{len(names):05d}"
                        ".safetensors ...; it is corrupt")
    return [folder / name for name in names]


def header_shapes(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, dtype)}`` from the safetensors header(s), without reading any tensor."""
    return _read_header(weight_files(Path(path)))[0]


def _read_header(files: list[Path]) -> tuple[dict[str, tuple[tuple[int, ...], str]], dict[str, str]]:
    """Every shard's tensors (each name in one shard only, where the index says) and their common
    metadata (every shard carries the same)."""
    header: dict[str, tuple[tuple[int, ...], str]] = {}
    metadata: dict[str, str] | None = None
    placed = _index_map(files)
    for weights in files:
        if not weights.is_file():
            raise PotqError(f"{weights} is missing or not a regular file: quantize the model again")
        try:
            with safe_open(str(weights), framework="pt") as f:
                part = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
                meta = f.metadata() or {}
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise PotqError(f"{weights} is corrupt ({first_line(exc)}): quantize the model again") from None
        if (metadata is not None and meta != metadata) or set(part) & set(header) or \
                (placed is not None and any(placed.get(k) != weights.name for k in part)):
            raise PotqError(f"{weights} does not belong with the other shards of its folder; it is corrupt")
        header.update(part)
        metadata = meta
    if placed is not None and set(placed) != set(header):
        raise PotqError(f"{files[0].parent / INDEX_FILE} does not list the tensors of its shards; it is corrupt")
    return header, metadata or {}


def _index_map(files: list[Path]) -> dict[str, str] | None:
    """The index's ``{tensor: shard}`` (None for an unsharded folder); :func:`weight_files` checked it."""
    if files == [files[0].parent / WEIGHTS_FILE]:
        return None
    index = load_json_object(read_small_file(files[0].parent / INDEX_FILE, "the shard index"), "the shard index")
    return {str(k): str(v) for k, v in index["weight_map"].items()}


def inspect(path: str | os.PathLike, skeleton: bool = True) -> Checked:
    """Everything short of reading tensor data: the manifest's schema, its digest and the tensor
    roles recorded in the weights' metadata, and every tensor's name, shape and dtype against the
    model the manifest describes (built on the meta device; with ``skeleton=False``, as ``potq
    info`` does to stay fast, only the packed layers' tensors against their table). Allocates
    nothing of the model."""
    folder = Path(path)
    manifest, raw = _read_manifest(folder)
    files = weight_files(folder)
    header, metadata = _read_header(files)
    weights = Checked(folder, manifest, header, metadata, files).weights
    if metadata.get(META_MANIFEST) != hashlib.sha256(raw).hexdigest():
        raise PotqError(f"{folder / MANIFEST_FILE} is not the description {weights.name} was saved with "
                        "(digest mismatch): it was edited or mixed up; quantize the model again")
    try:
        roles = json.loads(metadata.get(META_ROLES, ""))
    except ValueError:
        roles = None
    if roles != tensor_roles(manifest):
        raise PotqError(f"{weights}: the tensor roles in its metadata do not match {MANIFEST_FILE}; "
                        "quantize the model again")
    if skeleton:
        with torch.device("meta"):
            model = _skeleton(manifest, folder)
        _check_header(model, manifest, header, weights)
    else:
        for name, entry in manifest["quantized_layers"].items():
            for key, want in expected_layer_tensors(name, entry).items():
                if header.get(key) != want:
                    raise PotqError(f"{weights}: tensor {key} is {header.get(key)}, expected {want}; it is corrupt")
    return Checked(folder, manifest, header, metadata, files)


def _skeleton(manifest: dict[str, Any], folder: Path) -> nn.Module:
    """The model the manifest describes, packed layers in place (on whatever device is current)."""
    from potq.models import build_model

    model = build_model(manifest["architecture"])
    layers = manifest["quantized_layers"]
    for name, entry in layers.items():
        try:
            original = model.get_submodule(name)
        except AttributeError:
            original = None
        if _shape_of(original) != (entry.get("kind", "linear"), entry["out_features"], entry["in_features"]):
            raise PotqError(f"{folder / MANIFEST_FILE}: quantized layer {name} is not a "
                            f"{entry['out_features']}x{entry['in_features']} {entry.get('kind', 'linear')} of its "
                            "model; it is corrupt")
        packed = _packed_layer(entry)
        model.set_submodule(name, packed.keep_scale_of(original) if isinstance(packed, QuantEmbedding) else packed,
                            strict=True)
    for name, entry in layers.items():
        if entry.get("shares"):
            model.get_submodule(name).share_from(model.get_submodule(entry["shares"]))
    return model


def _shape_of(module: nn.Module | None) -> tuple[str, int, int] | None:
    """``(kind, rows, cols)`` of a float layer a packed one may replace."""
    if isinstance(module, nn.Linear):
        return "linear", module.out_features, module.in_features
    if isinstance(module, nn.Embedding):
        return "embedding", module.num_embeddings, module.embedding_dim
    return None


def _check_header(skeleton: nn.Module, manifest: dict[str, Any], header: dict, weights: Path) -> None:
    """Names, shapes and dtypes of the stored tensors are exactly the skeleton's; aliases point at
    stored tensors of the same shape."""
    expected = skeleton.state_dict()
    aliases = manifest.get("aliases", {})
    stored = set(expected) - set(aliases)
    for name, target in aliases.items():
        if name not in expected or target not in header or name in header:
            raise PotqError(f"{weights}: alias {name} -> {target} does not name a tensor of the model and a "
                            "stored one; the file is corrupt")
        if header[target][0] != tuple(expected[name].shape):
            raise PotqError(f"{weights}: alias {name} -> {target} joins tensors of different shapes; corrupt")
    missing, unexpected = sorted(stored - set(header)), sorted(set(header) - stored)
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise PotqError(f"{weights} does not match its potq.json ({what}): quantize again")
    for key, (shape, dtype) in header.items():
        want = expected[key]
        if tuple(want.shape) != shape:
            raise PotqError(f"{weights}: tensor {key} has shape {shape}, the model expects "
                            f"{tuple(want.shape)}: quantize the model again")
        allowed = FLOAT_DTYPES if want.is_floating_point() and want.dtype != torch.float16 else None
        if allowed is None:
            allowed = (SAFETENSORS_DTYPES.get(want.dtype, str(want.dtype)),)
        if dtype not in allowed:
            raise PotqError(f"{weights}: tensor {key} is {dtype}, expected {' or '.join(allowed)}; it is corrupt")


SAFETENSORS_DTYPES = {torch.uint8: "U8", torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL"}


def read_tensors(checked: Checked, visit: Callable[[str, torch.Tensor], None] | None = None) -> None:
    """Read every stored tensor once, in name order, handing each to ``visit`` (then dropping it):
    each is checked (scales finite and positive) as it comes, and all of them against the content
    checksum at the end — so a model is filled tensor by tensor, never holding a second copy."""
    digests = {}
    try:
        for name, tensor in _tensors_read(checked.files):
            digests[name] = tensor_digest(name, tensor)
            if name.endswith(".scales") and name[:-len(".scales")] in checked.manifest["quantized_layers"]:
                scales = tensor.float()
                if not bool(torch.isfinite(scales).all()) or not bool((scales > 0).all()):
                    raise PotqError(f"{checked.weights}: {name} holds a scale that is not finite and "
                                    "positive; the file is corrupt")
            if visit is not None:
                visit(name, tensor)
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise PotqError(f"{checked.weights} cannot be read ({first_line(exc)}); the file is corrupt") from None
    if combine_digests(digests) != checked.metadata.get(META_CONTENT):
        raise PotqError(f"{checked.weights}: the tensor bytes do not match their checksum; the file is "
                        "corrupt, quantize the model again")


_TORCH_DTYPES = {"U8": torch.uint8, "I8": torch.int8, "F16": torch.float16, "BF16": torch.bfloat16,
                 "F32": torch.float32, "F64": torch.float64, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool}


def _tensors_read(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` in name order over all shards, each read with a plain ``pread`` into its
    own memory: unlike safetensors' memory map, the file's pages do not stay mapped into the
    process, so a load's resident memory is the model's, not the model's plus the file's."""
    streams = [file.open("rb") for file in files]
    try:
        where: dict[str, tuple[int, dict, int]] = {}
        for stream in streams:
            (size,) = struct.unpack("<Q", stream.read(8))
            header = json.loads(stream.read(size))
            where.update({k: (stream.fileno(), v, 8 + size) for k, v in header.items() if k != "__metadata__"})
        for name in sorted(where):
            fd, entry, start = where[name]
            begin, end = entry["data_offsets"]
            data = bytearray(os.pread(fd, end - begin, start + begin))
            if len(data) != end - begin:
                raise OSError(f"{name} is cut short")
            dtype = _TORCH_DTYPES[entry["dtype"]]
            tensor = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
            yield name, tensor.reshape(entry["shape"])
    finally:
        for stream in streams:
            stream.close()


def verify(path: str | os.PathLike, skeleton: bool = True) -> Checked:
    """The full check ``potq verify`` runs: :func:`inspect`, every tensor's bytes against the
    checksum, scales finite and positive, and the tokenizer against the model's vocabulary
    (``skeleton=False``: ``potq info``'s quick form, which skips only the model build)."""
    checked = inspect(path, skeleton)
    read_tensors(checked)
    _tokenizer(checked)
    return checked


def _tokenizer(checked: Checked) -> Tokenizer:
    """The folder's tokenizer, its files checked against the digests in ``potq.json`` first."""
    files = checked.manifest.get("files")
    if not isinstance(files, dict) or set(files) != set(DIGESTED_FILES):
        raise PotqError(f"{checked.folder / MANIFEST_FILE} does not record the tokenizer's digests; it is corrupt")
    for name, digest in files.items():
        if _file_digest(checked.folder / name) != digest:
            raise PotqError(f"{checked.folder / name} is not the file the model was saved with (digest "
                            "mismatch); put the original back or quantize the model again")
    tokenizer = Tokenizer.load(checked.folder)
    check_vocabulary(tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id,
                     checked.manifest["architecture"]["config"], str(checked.folder))
    return tokenizer


# --- loading ----------------------------------------------------------------------------------
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


def load(path: str | os.PathLike) -> "LoadedModel":
    """Rebuild a saved model: same architecture, the same packed layers, the same tokenizer —
    after :func:`inspect` has checked the folder and the memory it needs is available."""
    checked = inspect(path)
    check_memory(_load_bytes(checked), f"loading {checked.folder}")
    tokenizer = _tokenizer(checked)
    # The float layers the packed ones replace, and the packed buffers, are allocated uninitialised:
    # the pages of the first are never written, those of the second once, by the copy below.
    model = _skeleton(checked.manifest, checked.folder)
    targets = model.state_dict(keep_vars=True)  # the model's own tensors (inspect checked the names)
    aliases: dict[str, list[str]] = {}
    for name, target in checked.manifest.get("aliases", {}).items():
        aliases.setdefault(target, []).append(name)

    def fill(name: str, tensor: torch.Tensor) -> None:
        with torch.no_grad():
            for key in (name, *aliases.get(name, [])):
                targets[key].copy_(tensor)

    read_tensors(checked, fill)
    model.eval()
    manifest = checked.manifest
    model.potq_meta = {k: manifest.get(k) for k in ("format", "bits", "group_size", "options", "method",
                                                     "method_settings", "calibration", "bpw", "allocation")}
    source = {**manifest.get("source", {}), "quantized": str(checked.folder.resolve())}
    from potq.models import LoadedModel

    return LoadedModel(model, tokenizer, source)


def _load_bytes(checked: Checked) -> int:
    """The model in memory (float tensors as float32, packed ones as stored) and the state dict read
    from the file beside it while it is copied in."""
    import math

    sizes = {"U8": 1, "F16": 2, "BF16": 2, "F32": 4, "I64": 8, "I32": 4, "BOOL": 1}
    stored = sum(math.prod(shape) * sizes.get(dtype, 8) for shape, dtype in checked.header.values())
    built = sum(math.prod(shape) * (4 if dtype in FLOAT_DTYPES else sizes.get(dtype, 8))
                for shape, dtype in checked.header.values())
    return stored + built


def _packed_layer(entry: dict[str, Any]) -> PackedWeight:
    """An empty packed layer of the kind and shape a ``quantized_layers`` entry describes."""
    fmt = get_format(entry["format"], entry["bits"])
    if entry.get("kind", "linear") == "embedding":
        return QuantEmbedding(entry["in_features"], entry["out_features"], fmt, entry["group_size"])
    return QuantLinear(entry["in_features"], entry["out_features"], fmt, entry["group_size"],
                       bias=entry.get("bias", False))
