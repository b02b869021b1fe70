"""A seeded mutator for every file kind potq reads, and a worker that runs each mutant.

Kinds: a potq folder (stories260K packed), a GGUF file, a llama2.c checkpoint and its
tokenizer, and a Hugging Face folder (a tiny random Llama). Mutations: byte flips (header and
data), truncations, crafted headers (counts, sizes, shapes), hostile JSON values in potq.json,
config.json and the tokenizer files (re-signed, so the checks behind the digests are reached),
pickles and FIFOs. Every run must end in one of:

- ``same``: loaded, and the logits on a fixed prompt equal the unmutated model's;
- ``changed``: loaded with other logits — allowed only for formats that carry no checksum
  (GGUF, llama2.c, Hugging Face: a flipped weight byte there *is* another model) and for a potq
  folder whose edited description was re-signed (a consistent writer describing another model);
  a potq folder that loads other logits after any unsigned change is a silent wrong result;
- ``error``: a one-line :class:`PotqError`;

within a time bound per run and a memory bound on the whole worker. Anything else — another
exception, a multi-line message, a timeout, a crash of the worker — is a failure.

Run: ``python -m tests.fuzzing --cases 400 --seed 0 --json out.json`` (the test suite runs a
few hundred cases; ``benchmarks/reliability.py`` runs more and writes docs/reliability.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import resource
import shutil
import signal
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

CASE_SECONDS = 20
MEMORY_BYTES = 6 << 30
IDS = torch.tensor([[1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298]])
HOSTILE_NUMBERS = [0, -1, 1, 2, 3, 7, 63, 64, 65, 100000, 65536, 2**31 - 1, 2**32 - 1, 2**63 - 1, -(2**63), 1e308,
                   float("nan"), float("inf"), 0.5, 32.0]
HOSTILE_VALUES = [*HOSTILE_NUMBERS, None, True, False, "", "x", "pot", "uniform-sym", "../../etc/passwd", [], {},
                  [1, 2], {"a": 1}, "\udcff"]


class Timeout(Exception):
    pass


def _alarm(signum, frame):  # noqa: ANN001
    raise Timeout


# --- the originals -----------------------------------------------------------------------------------
def make_originals(work: Path) -> dict[str, Path]:
    """The unmutated inputs of each kind, written under ``work``."""
    import potq
    from transformers import LlamaConfig, LlamaForCausalLM

    from potq.paths import shared_file

    originals = {}
    lm = potq.load_model("stories260k")
    potq.quantize_(lm, potq.PoTConfig(bits=3, group_size=32), progress=False)
    originals["potq"] = potq.save(lm, work / "potq")
    lm = potq.load_model("stories260k")
    potq.quantize_(lm, potq.UniformConfig(bits=4, group_size=32), embeddings=True, progress=False)
    originals["potq-emb"] = potq.save(lm, work / "potq-emb")
    gguf = shared_file("models/stories260K/stories260K.gguf")
    (work / "gguf").mkdir()
    originals["gguf"] = Path(shutil.copy(gguf, work / "gguf" / "model.gguf"))
    (work / "llama2c").mkdir()
    originals["llama2c"] = Path(shutil.copy(gguf.with_name("stories260K.bin"), work / "llama2c" / "model.bin"))
    shutil.copy(gguf.with_name("tok512.bin"), work / "llama2c" / "tok512.bin")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(work / "hf")
    potq.load_model("stories260k").tokenizer.backend.save(str(work / "hf" / "tokenizer.json"))
    originals["hf"] = work / "hf"
    return originals


def load_kind(kind: str, path: Path):  # noqa: ANN201
    import potq

    return potq.load(path) if kind.startswith("potq") else potq.load_model(str(path))


def logits(lm) -> torch.Tensor:  # noqa: ANN001
    with torch.inference_mode():
        return lm.model(IDS).logits


# --- mutations ---------------------------------------------------------------------------------------
def flip(path: Path, rng: random.Random, lo: int = 0, hi: int | None = None) -> str:
    data = bytearray(path.read_bytes())
    hi = len(data) if hi is None else min(hi, len(data))
    if hi <= lo:
        return "flip (empty)"
    spots = [rng.randrange(lo, hi) for _ in range(rng.randint(1, 4))]
    for spot in spots:
        data[spot] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return f"flip {path.name} @{spots}"


def truncate(path: Path, rng: random.Random) -> str:
    data = path.read_bytes()
    cut = rng.randrange(len(data))
    path.write_bytes(data[:cut])
    return f"truncate {path.name} to {cut}"


def json_leaves(value, prefix=()) -> list[tuple]:  # noqa: ANN001
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in json_leaves(v, (*prefix, k))] + [prefix]
    if isinstance(value, list):
        return [p for i, v in enumerate(value[:8]) for p in json_leaves(v, (*prefix, i))] + [prefix]
    return [prefix]


def mutate_json(value: dict, rng: random.Random) -> tuple[object, str]:
    """``value`` with one leaf or branch set to a hostile value or deleted (or replaced whole)."""
    value = copy.deepcopy(value)
    path = rng.choice([p for p in json_leaves(value) if p])
    parent = value
    for key in path[:-1]:
        parent = parent[key]
    roll = rng.random()
    if roll < 0.15 and isinstance(parent, dict):
        del parent[path[-1]]
        return value, f"delete {'.'.join(map(str, path))}"
    if roll < 0.2:
        return rng.choice([[value], 1, "x", None]), "replace the whole document"
    new = rng.choice(HOSTILE_VALUES)
    if isinstance(new, str) and new == "\udcff":
        new = "bad\x00name"
    parent[path[-1]] = new
    return value, f"set {'.'.join(map(str, path))} = {new!r}"


def dump(value: object) -> str:
    return json.dumps(value, allow_nan=True)


def mutate_potq(folder: Path, rng: random.Random) -> str:
    from tests.hostile import resign, safetensors_header_size

    weights = folder / "model.safetensors"
    roll = rng.randrange(9)
    if roll == 0:
        return flip(weights, rng, 0, safetensors_header_size(weights))
    if roll == 1:
        return flip(weights, rng, safetensors_header_size(weights))
    if roll == 2:
        return truncate(weights, rng)
    if roll == 3:
        return flip(folder / rng.choice(["potq.json", "tokenizer.json", "tokenizer_specials.json"]), rng)
    if roll == 4:
        return truncate(folder / rng.choice(["potq.json", "tokenizer.json", "tokenizer_specials.json"]), rng)
    if roll == 5:
        return crafted_safetensors_header(weights, rng)
    if roll == 6:  # hostile special ids / tokenizer, the manifest re-signed to their new digests
        import hashlib

        specials = json.loads((folder / "tokenizer_specials.json").read_text())
        mutated, what = mutate_json(specials, rng)
        (folder / "tokenizer_specials.json").write_text(dump(mutated))
        manifest = json.loads((folder / "potq.json").read_text())
        manifest["files"]["tokenizer_specials.json"] = hashlib.sha256(
            (folder / "tokenizer_specials.json").read_bytes()).hexdigest()
        resign(folder, manifest)
        return f"specials: {what} (re-signed)"
    manifest = json.loads((folder / "potq.json").read_text())
    mutated, what = mutate_json(manifest, rng)
    if isinstance(mutated, dict):
        resign(folder, mutated)
    else:
        resign(folder, text=dump(mutated))
    return f"potq.json: {what} (re-signed)"


def crafted_safetensors_header(weights: Path, rng: random.Random) -> str:
    """Rewrite the JSON header: one tensor's shape, dtype or offsets set to a hostile value."""
    data = weights.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    name = rng.choice([k for k in header if k != "__metadata__"])
    field = rng.choice(["shape", "dtype", "data_offsets"])
    value = {"shape": rng.choice([[100000, 100000], [2**32 - 1], [0], [], [1, 2, 3]]),
             "dtype": rng.choice(["I32", "F64", "BOOL", "XX"]),
             "data_offsets": rng.choice([[0, 2**40], [5, 3], [0, 0]])}[field]
    header[name][field] = value
    raw = json.dumps(header).encode()
    weights.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + size:])
    return f"safetensors header: {name}.{field} = {value}"


def mutate_gguf(path: Path, rng: random.Random) -> str:
    from tests.hostile import gguf_field_offset, gguf_tensor_data_start

    roll = rng.randrange(6)
    if roll in (0, 1):
        return flip(path, rng, 0, gguf_tensor_data_start(path))
    if roll == 2:
        return truncate(path, rng)
    if roll == 3:
        data = bytearray(path.read_bytes())
        spot = rng.choice([4, 8, 16])
        value = rng.choice([0, 2**64 - 1, 2**32 - 1, 100000, 7])
        data[spot:spot + (4 if spot == 4 else 8)] = value.to_bytes(8, "little")[:4 if spot == 4 else 8]
        path.write_bytes(bytes(data))
        return f"GGUF header @{spot} = {value}"
    if roll == 4:
        return flip(path, rng, gguf_tensor_data_start(path))
    key = rng.choice(["llama.block_count", "llama.embedding_length", "llama.attention.head_count",
                      "llama.feed_forward_length", "llama.context_length", "llama.attention.head_count_kv",
                      "tokenizer.ggml.bos_token_id", "llama.rope.dimension_count"])
    try:
        offset, length = gguf_field_offset(path, key)
    except KeyError:
        return f"{key} absent"
    value = rng.choice([0, 1, 3, 100000, 65536, 2**31 - 1, 2**32 - 1])
    data = bytearray(path.read_bytes())
    data[offset:offset + length] = (value % (1 << (8 * length))).to_bytes(length, "little")
    path.write_bytes(bytes(data))
    return f"GGUF {key} = {value}"


def mutate_llama2c(path: Path, rng: random.Random) -> str:
    tokenizer = path.with_name("tok512.bin")
    roll = rng.randrange(5)
    if roll in (0, 1):
        data = bytearray(path.read_bytes())
        index = rng.randrange(7)
        value = rng.choice([0, -1, 1, 3, 100000, 65536, 2**31 - 1, -(2**31)])
        struct.pack_into("<i", data, 4 * index, value)
        path.write_bytes(bytes(data))
        return f"llama2.c header int {index} = {value}"
    if roll == 2:
        return truncate(path, rng)
    if roll == 3:
        return flip(tokenizer, rng)
    return truncate(tokenizer, rng)


def mutate_hf(folder: Path, rng: random.Random) -> str:
    from tests.hostile import safetensors_header_size

    weights = folder / "model.safetensors"
    roll = rng.randrange(8)
    if roll in (0, 1, 2):
        config = json.loads((folder / "config.json").read_text())
        mutated, what = mutate_json(config, rng)
        (folder / "config.json").write_text(dump(mutated))
        return f"config.json: {what}"
    if roll == 3:
        return flip(weights, rng, 0, safetensors_header_size(weights))
    if roll == 4:
        return truncate(weights, rng)
    if roll == 5:
        target = folder / rng.choice(["tokenizer.json", "config.json"])
        return flip(target, rng) if rng.random() < 0.5 else truncate(target, rng)
    if roll == 6:
        torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
        weights.unlink()
        return "pickle only"
    (folder / "tokenizer.json").unlink()
    os.mkfifo(folder / "tokenizer.json")
    return "FIFO tokenizer.json"


MUTATORS: dict[str, Callable[[Path, random.Random], str]] = {
    "potq": mutate_potq, "potq-emb": mutate_potq, "gguf": mutate_gguf, "llama2c": mutate_llama2c, "hf": mutate_hf,
}
CHECKSUMMED = {"potq", "potq-emb"}


# --- running -----------------------------------------------------------------------------------------
def run(cases: int, seed: int, work: Path) -> dict:
    """Run ``cases`` mutants (kinds in turn) and count the outcomes; failures listed in full."""
    from potq.errors import PotqError

    originals = make_originals(work / "originals")
    references = {kind: logits(load_kind(kind, path)) for kind, path in originals.items()}
    rng = random.Random(seed)
    counts: dict[str, Counter] = {kind: Counter() for kind in originals}
    failures, slowest = [], 0.0
    signal.signal(signal.SIGALRM, _alarm)
    kinds = list(originals)
    for case in range(cases):
        kind = kinds[case % len(kinds)]
        target = work / "case" / originals[kind].parent.name
        shutil.rmtree(work / "case", ignore_errors=True)
        shutil.copytree(originals[kind].parent if originals[kind].is_file() else originals[kind], target)
        path = target / originals[kind].name if originals[kind].is_file() else target
        what = MUTATORS[kind](path, rng)
        start = time.perf_counter()
        signal.alarm(CASE_SECONDS)
        try:
            lm = load_kind(kind, path)
            lm.tokenizer.decode(lm.tokenizer.encode("Once upon a time"))
            outcome = "same" if torch.equal(logits(lm), references[kind]) else "changed"
            if outcome == "changed" and kind in CHECKSUMMED and "(re-signed)" not in what:
                failures.append({"kind": kind, "case": case, "mutation": what, "outcome": "silent wrong result"})
        except PotqError as exc:
            outcome = "error"
            if "\n" in str(exc):
                failures.append({"kind": kind, "case": case, "mutation": what, "outcome": "multi-line error"})
        except Timeout:
            outcome = "timeout"
            failures.append({"kind": kind, "case": case, "mutation": what, "outcome": f"over {CASE_SECONDS} s"})
        except BaseException as exc:  # noqa: BLE001 - every other exception is what the fuzzer looks for
            outcome = "exception"
            failures.append({"kind": kind, "case": case, "mutation": what,
                             "outcome": f"{type(exc).__name__}: {str(exc)[:200]}"})
        finally:
            signal.alarm(0)
        slowest = max(slowest, time.perf_counter() - start)
        counts[kind][outcome] += 1
    return {"cases": cases, "seed": seed, "counts": {k: dict(v) for k, v in counts.items()},
            "failures": failures, "slowest_case_s": round(slowest, 2), "case_limit_s": CASE_SECONDS,
            "memory_limit_bytes": MEMORY_BYTES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, required=True, help="an empty scratch folder")
    parser.add_argument("--json", type=Path, required=True, help="write the counts and failures here")
    args = parser.parse_args()
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    torch.set_num_threads(1)
    result = run(args.cases, args.seed, args.work)
    args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
