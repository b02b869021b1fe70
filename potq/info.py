"""What a saved model costs: bits per weight including scales, size on disk, per-layer table.

Everything here reads ``potq.json`` and the safetensors header only, so ``potq info`` is instant
and works on a folder whose model would not fit in memory.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from potq.storage import MANIFEST_FILE, header_shapes, read_manifest, weight_files

_DTYPE_BYTES = {"U8": 1, "I8": 1, "F16": 2, "BF16": 2, "F32": 4, "I32": 4, "I64": 8, "F64": 8}


@dataclass
class LayerCost:
    name: str
    shape: tuple[int, int]
    format: str
    bits: int
    group_size: int
    stored_bytes: int  # codes + scales + zeros
    kind: str = "linear"  # or "embedding"

    @property
    def weights(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.stored_bytes / self.weights


def tensor_bytes(shape: tuple[int, ...], dtype: str) -> int:
    return math.prod(shape) * _DTYPE_BYTES[dtype]


def layer_costs(folder: str | Path) -> list[LayerCost]:
    manifest, header = read_manifest(folder), header_shapes(folder)
    costs = []
    for name, e in manifest["quantized_layers"].items():
        if e.get("shares"):  # a tied head: its codes are counted with its embedding table
            continue
        stored = sum(tensor_bytes(*header[f"{name}.{part}"]) for part in ("codes", "scales", "zeros")
                     if f"{name}.{part}" in header)
        costs.append(LayerCost(name, (e["out_features"], e["in_features"]), e["format"], e["bits"],
                               e["group_size"], stored, e.get("kind", "linear")))
    return costs


def summary(folder: str | Path) -> dict[str, Any]:
    """The numbers ``potq info`` prints, as a dict (also written by ``--json``)."""
    folder = Path(folder)
    manifest, header = read_manifest(folder), header_shapes(folder)
    all_costs = layer_costs(folder)
    costs = [c for c in all_costs if c.kind == "linear"]
    tables = [c for c in all_costs if c.kind == "embedding"]
    q_weights = sum(c.weights for c in costs)
    q_bytes = sum(c.stored_bytes for c in costs)
    e_weights = sum(c.weights for c in tables)
    e_bytes = sum(c.stored_bytes for c in tables)
    all_bytes = sum(tensor_bytes(*v) for v in header.values())
    code_bytes = sum(tensor_bytes(*v) for k, v in header.items() if k.endswith(".codes"))
    packed = {f"{name}.{part}" for name in manifest["quantized_layers"] for part in ("codes", "scales", "zeros")}
    floats = sorted(((k, tensor_bytes(*v), v[1]) for k, v in header.items() if k not in packed),
                    key=lambda item: -item[1])
    return {
        "path": str(folder),
        "format": manifest.get("format"), "bits": manifest.get("bits"),
        "group_size": manifest.get("group_size"), "method": manifest.get("method"), "bpw": manifest.get("bpw"),
        "widths": dict(sorted(Counter(f"{c.format}{c.bits}" for c in costs).items())),
        "method_settings": manifest.get("method_settings"),
        "source": manifest.get("source", {}),
        "quantized_layers": len(costs),
        "quantized_weights": q_weights,
        "bits_per_quantized_weight": 8 * q_bytes / q_weights if q_weights else None,
        "quantized_bytes": q_bytes,
        "quantized_embedding_tables": len(tables),
        "bits_per_embedding_weight": 8 * e_bytes / e_weights if e_weights else None,
        "embedding_bytes": e_bytes,
        "float_bytes": all_bytes - q_bytes - e_bytes,
        "code_bytes": code_bytes,
        "scale_bytes": q_bytes + e_bytes - code_bytes,
        "largest_float_tensors": [list(f) for f in floats[:3] if f[1] >= 2**20],
        "file_bytes": sum(file.stat().st_size for file in weight_files(folder)),
        "folder_bytes": sum(p.stat().st_size for p in folder.iterdir() if p.is_file()),
        "manifest": MANIFEST_FILE,
    }
