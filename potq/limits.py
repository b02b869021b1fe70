"""Hard limits every loader checks a declared model against before it allocates anything.

A model file is data from a stranger: its header may declare 2^32-1 blocks, a 65536-wide
embedding, or a 100 MB "JSON" file. Each loader first reads only the small description (a
config, a GGUF header, a potq.json), checks it here against limits no real model reaches and
against the memory this machine has, and only then builds tensors. Reading a description
itself is bounded too (:func:`read_small_file`): a FIFO or a huge file is refused, not waited on.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from potq.errors import PotqError, first_line

# Far above any released decoder (Llama-3-405B: 126 layers, d=16384, ffn 53248, vocab 128256).
MAX_LAYERS = 1024
MAX_WIDTH = 1 << 17  # hidden size, ffn size, head counts × head size
MAX_VOCAB = 1 << 21
MAX_POSITIONS = 1 << 22
MAX_JSON_BYTES = 64 << 20  # potq.json, config.json, tokenizer_specials.json
MAX_TOKENIZER_BYTES = 512 << 20
MAX_JSON_DEPTH = 64


def read_small_file(path: Path, what: str, max_bytes: int = MAX_JSON_BYTES) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; a FIFO, a device, a folder or a
    larger file is refused in one line instead of hanging or filling memory."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise PotqError(f"cannot read {what} {path} ({exc.strerror or first_line(exc)})") from None
    if not stat.S_ISREG(info.st_mode):
        raise PotqError(f"{what} {path} is not a regular file; put the real file there")
    if info.st_size > max_bytes:
        raise PotqError(f"{what} {path} is {info.st_size:,} bytes, more than the {max_bytes:,} potq accepts; "
                        "it is not a file potq wrote")
    try:
        with open(path, "rb") as stream:
            return stream.read(max_bytes + 1)[:max_bytes]
    except OSError as exc:
        raise PotqError(f"cannot read {what} {path} ({exc.strerror or first_line(exc)})") from None


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def load_json_object(raw: bytes, what: str) -> dict[str, Any]:
    """A JSON object from ``raw``: NaN/Infinity, nesting deeper than :data:`MAX_JSON_DEPTH`,
    invalid UTF-8 and a top level that is not an object are each one line, not a traceback."""
    try:
        text = raw.decode("utf-8")
        if _nesting(text) > MAX_JSON_DEPTH:
            raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
        value = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise PotqError(f"{what} is not valid JSON ({first_line(exc)}); it is corrupt") from None
    if not isinstance(value, dict):
        raise PotqError(f"{what} holds a JSON {type(value).__name__}, not an object; it is corrupt")
    return value


def _nesting(text: str) -> int:
    """The deepest bracket nesting of a JSON text (strings skipped), in one linear pass."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def whole_number(value: Any, name: str, lo: int, hi: int, what: str) -> int:
    """``value`` if it is an int (not a bool, not a float) in ``[lo, hi]``, else one line."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise PotqError(f"{what}: {name} is {value!r}, expected a whole number from {lo} to {hi}; it is corrupt")
    return value


# config fields (any transformers family spells them one of these ways) -> their limit
_CONFIG_LIMITS = {
    "num_hidden_layers": MAX_LAYERS, "n_layer": MAX_LAYERS,
    "hidden_size": MAX_WIDTH, "n_embd": MAX_WIDTH, "intermediate_size": MAX_WIDTH, "n_inner": MAX_WIDTH,
    "num_attention_heads": MAX_WIDTH, "n_head": MAX_WIDTH, "num_key_value_heads": MAX_WIDTH,
    "head_dim": MAX_WIDTH,
    "vocab_size": MAX_VOCAB,
    "max_position_embeddings": MAX_POSITIONS, "n_positions": MAX_POSITIONS,
}


def check_config(config: Mapping[str, Any], what: str) -> None:
    """Every size a model config declares is a whole number within the hard limits."""
    for key, limit in _CONFIG_LIMITS.items():
        if config.get(key) is not None:
            whole_number(config[key], key, 1, limit, what)


def memory_available() -> int | None:
    """Bytes this process may still allocate: ``MemAvailable`` (Linux), else None (not checked)."""
    try:
        with open("/proc/meminfo") as stream:
            for line in stream:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(needed: int, what: str) -> None:
    """Refuse, before allocating, a model whose tensors need more memory than is available."""
    available = memory_available()
    if available is not None and needed > available:
        raise PotqError(f"{what} needs about {needed / 2**30:.1f} GiB of memory, this machine has "
                        f"{available / 2**30:.1f} GiB available; free memory or use a smaller model")


def check_tensors(expected: Mapping[str, tuple[int, ...]], present: Mapping[str, tuple[int, ...]],
                  what: str, allowed_extra: set[str] = frozenset()) -> None:
    """The tensors a file holds are exactly the ones its model needs, shape for shape: a config
    that claims 2 layers over weights of 5 (or the reverse) is refused, not half-loaded."""
    missing = sorted(set(expected) - set(present))
    extra = sorted(set(present) - set(expected) - set(allowed_extra))
    if missing:
        raise PotqError(f"{what} lacks {len(missing)} tensor(s) its description needs ({', '.join(missing[:3])}); "
                        "the file is truncated or its description is wrong")
    if extra:
        raise PotqError(f"{what} holds {len(extra)} tensor(s) its description does not have "
                        f"({', '.join(extra[:3])}); the description does not match the weights")
    for name, shape in expected.items():
        if tuple(present[name]) != tuple(shape):
            raise PotqError(f"{what}: tensor {name} has shape {tuple(present[name])}, its description says "
                            f"{tuple(shape)}; the file is corrupt")


def float_bytes(shapes: Mapping[str, tuple[int, ...]], bytes_per_value: int = 4) -> int:
    return sum(math.prod(shape) for shape in shapes.values()) * bytes_per_value


def check_vocabulary(tokens: int, bos: Any, eos: Any, config: Mapping[str, Any], source: str) -> None:
    """A tokenizer may not produce ids the embedding has no row for (an index error at the first
    unlucky token otherwise), nor name BOS/EOS ids outside it."""
    rows = config.get("vocab_size")
    if not isinstance(rows, int):
        return
    if tokens > rows:
        raise PotqError(f"{source}: the tokenizer has {tokens} tokens but the model's embedding "
                        f"only {rows} rows; use the model's own tokenizer")
    for name, token in (("BOS", bos), ("EOS", eos)):
        if token is not None and not (isinstance(token, int) and 0 <= token < rows):
            raise PotqError(f"{source}: the tokenizer's {name} id {token!r} is outside the vocabulary of {rows}")
