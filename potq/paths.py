"""Where the shared models and data live, and where models trained here go.

Nothing is ever downloaded: models and data sets come from the read-only ``shared/`` folder
beside the checkout, or from ``$POTQ_SHARED`` when that is set. Models potq trains itself (the
char-level nanoGPT) are written under ``$POTQ_HOME`` (default ``~/.cache/potq``), never into
the shared folder.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from potq.errors import PotqError

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_dir() -> Path:
    """The shared folder: ``$POTQ_SHARED``, else ``../shared`` relative to the repository root."""
    env = os.environ.get("POTQ_SHARED")
    return Path(env).expanduser().resolve() if env else (REPO_ROOT.parent / "shared").resolve()


def shared_file(relative: str) -> Path:
    """A file inside the shared folder, or a one-line error that says how to point potq at it."""
    path = shared_dir() / relative
    if not path.is_file():
        raise PotqError(
            f"{path} not found: put the shared folder beside the checkout or set POTQ_SHARED to it"
        )
    return path


def home_dir() -> Path:
    """potq's own writable folder: ``$POTQ_HOME``, else ``~/.cache/potq`` (one line if it names
    something that is not a folder)."""
    home = Path(os.environ.get("POTQ_HOME", "~/.cache/potq")).expanduser().resolve()
    if home.exists() and not home.is_dir():
        raise PotqError(f"POTQ_HOME {home} is not a folder: point POTQ_HOME at a folder potq may write to")
    return home


def trained_model_dir(name: str) -> Path:
    """Where the model potq trains under the short name ``name`` is saved."""
    return home_dir() / "models" / name


def sha256_of_files(files: list[Path]) -> str:
    """One hex digest over the bytes of ``files`` in order, read in chunks (models can be GBs)."""
    digest = hashlib.sha256()
    for file in files:
        with Path(file).open("rb") as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename, creating the parent
    folder, so a reader never sees a half-written file and an interrupted write leaves the old one."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    return out
