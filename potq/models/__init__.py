"""Model loaders: every source file becomes a transformers causal LM plus a :class:`Tokenizer`.

The names below live in :mod:`potq.models.loading` and are imported on first use, so that a
light submodule (the tokenizer, the registry of short names) can be imported without paying for
transformers — ``potq info`` and ``potq --help`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["SHORT_NAMES", "LoadedModel", "architecture", "build_model", "load_model", "transformer_blocks"]


def __getattr__(name: str) -> Any:
    if name in __all__ or name == "LOADERS":
        return getattr(importlib.import_module("potq.models.loading"), name)
    raise AttributeError(f"module 'potq.models' has no attribute {name!r}")
