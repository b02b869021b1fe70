"""Short names for models: the ones in the shared folder and the ones potq trains itself.

Tests, the CLI and reports name models by a short, stable word instead of a long path. A shared
model's path stays relative to the shared folder, so a checkout works wherever that folder lives;
a trained model lives under ``$POTQ_HOME`` once the command that makes it has run, and so does a
model too large for the shared folder once the benchmark that fetches it (by package name, hash-checked)
has run. Adding a model is one line in :data:`SHORT_NAMES`, :data:`TRAINED_NAMES` or :data:`FETCHED_NAMES`.
"""

from __future__ import annotations

from pathlib import Path

from potq.errors import PotqError
from potq.paths import home_dir, shared_file, trained_model_dir

SHORT_NAMES: dict[str, str] = {
    "smollm2-135m": "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf",
    "stories260k": "models/stories260K/stories260K.gguf",
}
# short name -> the command that trains it into trained_model_dir(name)
TRAINED_NAMES: dict[str, str] = {
    "nanogpt-shakespeare": "potq train-char",
}
# short name -> (its file under $POTQ_HOME/models, the command that fetches it there)
FETCHED_NAMES: dict[str, tuple[str, str]] = {
    "gemma3-270m": ("gemma3-270m/gemma-3-270m-q4_k_m.gguf", "python benchmarks/gemma3.py --fetch-only"),
}


def short_names() -> list[str]:
    """Every short name, the shared models first."""
    return [*SHORT_NAMES, *TRAINED_NAMES, *FETCHED_NAMES]


def resolve(spec: str) -> tuple[str | None, Path]:
    """``(short name or None, existing path)`` for a short name or a path to a model file/folder."""
    if spec in SHORT_NAMES:
        return spec, shared_file(SHORT_NAMES[spec])
    if spec in TRAINED_NAMES:
        folder = trained_model_dir(spec)
        if not folder.is_dir():
            raise PotqError(f"{spec} is not trained yet ({folder} is missing): run `{TRAINED_NAMES[spec]}` first")
        return spec, folder
    if spec in FETCHED_NAMES:
        relative, command = FETCHED_NAMES[spec]
        path = home_dir() / "models" / relative
        if not path.is_file():
            raise PotqError(f"{spec} is not fetched yet ({path} is missing): run `{command}` first")
        return spec, path
    path = Path(spec).expanduser()
    if not path.exists():
        names = ", ".join(short_names())
        raise PotqError(f"{spec}: no such file or folder; give a model path or one of the short names {names}")
    return None, path.resolve()
