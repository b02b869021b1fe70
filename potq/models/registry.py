"""Short names for the models in the shared folder.

Tests, the CLI and reports name models by a short, stable word instead of a long path, and the
path stays relative to the shared folder so a checkout works wherever that folder lives. Adding a
model is one line in :data:`SHORT_NAMES`.
"""

from __future__ import annotations

from pathlib import Path

from potq.errors import PotqError
from potq.paths import shared_file

SHORT_NAMES: dict[str, str] = {
    "smollm2-135m": "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf",
    "stories260k": "models/stories260K/stories260K.gguf",
}


def resolve(spec: str) -> tuple[str | None, Path]:
    """``(short name or None, existing path)`` for a short name or a path to a model file/folder."""
    if spec in SHORT_NAMES:
        return spec, shared_file(SHORT_NAMES[spec])
    path = Path(spec).expanduser()
    if not path.exists():
        names = ", ".join(SHORT_NAMES)
        raise PotqError(f"{spec}: no such file or folder; give a model path or one of the short names {names}")
    return None, path.resolve()
