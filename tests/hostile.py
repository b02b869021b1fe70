"""Hostile inputs, shared by the explicit safety tests and the fuzz suite.

``resign`` plays a consistent attacker (or a buggy writer): after editing ``potq.json`` it
recomputes the digests in the weights' metadata, so the checks *behind* the digest — schema,
shapes, aliases, scales — are the ones that must catch the edit.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from potq.storage import META_MANIFEST, META_ROLES, MANIFEST_FILE, WEIGHTS_FILE, tensor_roles


def resign(folder: Path, manifest: dict | None = None, text: str | None = None) -> None:
    """Write ``manifest`` (or raw ``text``) as potq.json and make the weights' metadata agree."""
    raw = (text if text is not None else json.dumps(manifest)).encode()
    (folder / MANIFEST_FILE).write_bytes(raw)
    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as f:
        metadata, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    metadata[META_MANIFEST] = hashlib.sha256(raw).hexdigest()
    try:
        metadata[META_ROLES] = json.dumps(tensor_roles(manifest or {}), sort_keys=True)
    except Exception:  # a manifest too hostile to have roles: keep the old ones
        pass
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata=metadata)


def safetensors_header_size(path: Path) -> int:
    """Bytes of a safetensors file before its tensor data (8-byte length + JSON header)."""
    with path.open("rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def gguf_field_offset(path: Path, key: str) -> tuple[int, int]:
    """(byte offset, byte length) of a scalar metadata value inside a GGUF file."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    field = reader.fields[key]
    part = field.parts[field.data[0]]
    return int(part.ctypes.data - reader.data.ctypes.data), int(part.nbytes)


def gguf_tensor_data_start(path: Path) -> int:
    """Where a GGUF file's tensor data begins (everything before it is header and metadata)."""
    from gguf import GGUFReader

    return int(GGUFReader(path).data_offset)
