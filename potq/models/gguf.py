"""LLaMA-architecture GGUF files (llama.cpp's format), expanded to a float32 transformers model.

The quantized tensors are dequantized once at load time: potq re-quantizes from float weights, so
a Q4_1 file becomes its "Q4_1-expanded" float reference.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize
from tokenizers import pre_tokenizers
from transformers import LlamaConfig, PreTrainedModel
from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING

from potq.models import llama
from potq.errors import PotqError, first_line
from potq.limits import MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, MAX_WIDTH, whole_number
from potq.models.tokenizer import Tokenizer

# llama.cpp's legacy, k- and i-quant types (any llama.cpp-quantized file is read, and can be evaluated as a peer)
EXPANDED_TYPES = {GGMLQuantizationType[name] for name in (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0",
    "MXFP4")}  # every type the gguf package dequantizes (tested)
GLOBAL_TENSORS = {"token_embd.weight": llama.EMBEDDING, "output_norm.weight": llama.FINAL_NORM,
                  "output.weight": llama.CLASSIFIER}
BLOCK_TENSORS = {
    "attn_norm": llama.ATTN_NORM, "attn_q": llama.ATTN_Q, "attn_k": llama.ATTN_K, "attn_v": llama.ATTN_V,
    "attn_output": llama.ATTN_OUT, "ffn_norm": llama.FFN_NORM, "ffn_gate": llama.FFN_GATE,
    "ffn_up": llama.FFN_UP, "ffn_down": llama.FFN_DOWN,
}
# llama.cpp pre-tokenizers that split every number character (\p{N}) off before the byte-level
# split, as the models were trained; transformers' GGUF converter leaves that step out.
DIGIT_SPLIT_PRE = {"smollm"}
_REQUIRED = object()


class _FastReader(GGUFReader):
    """``GGUFReader`` that parses metadata arrays in one step each.

    The stock reader makes two numpy views per array element, which takes ~6 s for SmolLM2's
    49k tokens and merges; here a number array is one view and a string array one view per string
    (~0.2 s). ``field.contents()`` returns the same values (checked against the stock reader).
    """

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list, list[int], list[GGUFValueType]]:
        if raw_type != GGUFValueType.ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        item_type, count = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
        item = GGUFValueType(item_type[0])
        offset = orig_offs + 12
        if item in self.gguf_scalar_to_np:
            values = self._get(offset, self.gguf_scalar_to_np[item], count[0])
            return 12 + int(values.nbytes), [item_type, count, values], [2], [GGUFValueType.ARRAY, item]
        if item != GGUFValueType.STRING:
            return super()._get_field_parts(orig_offs, raw_type)
        buffer = memoryview(self.data)
        parts = [item_type, count]
        for _ in range(int(count[0])):
            (length,) = struct.unpack_from("=Q", buffer, offset)
            parts.append(np.frombuffer(buffer, np.uint8, length, offset + 8))
            offset += 8 + length
        return offset - orig_offs, parts, list(range(2, len(parts))), [GGUFValueType.ARRAY, item]


def load(path: Path) -> tuple[PreTrainedModel, Tokenizer]:
    """The float32 ``LlamaForCausalLM`` and the tokenizer stored in a GGUF file.

    The header is checked before it is parsed (:func:`_check_header`), and the declared
    architecture against the tensors present before any tensor is dequantized."""
    reader = _open(path)
    architecture = _field(reader, "general.architecture")
    if architecture in VIA_TRANSFORMERS:
        return _load_via_transformers(reader, path, architecture)
    config = _checked_llama(reader, path, architecture)
    tokenizer = _tokenizer(reader, path)
    return llama.build_llama(config, _weights(reader, path), str(path)), tokenizer


def lazy_load(path: Path) -> tuple[PreTrainedModel, Tokenizer] | None:
    """A ``llama`` GGUF's model with its blocks left in the file, each tensor dequantized when the
    block-wise engine reaches it (:mod:`potq.models.lazy`); None for the architectures
    transformers reads (they load whole)."""
    from accelerate import init_empty_weights

    from potq.models.hf import empty_model
    from potq.models.lazy import attach

    reader = _open(path)
    architecture = _field(reader, "general.architecture")
    if architecture in VIA_TRANSFORMERS:
        return None
    config = _checked_llama(reader, path, architecture)
    tokenizer = _tokenizer(reader, path)
    with init_empty_weights():  # parameters on the meta device, the rotary tables real
        model = empty_model(config)
    return attach(model, GGUFTensors(reader, path, config)), tokenizer


class GGUFTensors:
    """A llama GGUF's tensors by transformers name, dequantized to float32 one at a time (q and k
    back from llama.cpp's interleaved rotary order)."""

    prefix = "model."

    def __init__(self, reader: GGUFReader, path: Path, config: LlamaConfig) -> None:
        self.tensors = {_torch_name(t.name, path): t for t in reader.tensors}
        self.where = {name.removeprefix(self.prefix): name for name in self.tensors}
        self.heads = {llama.ATTN_Q: config.num_attention_heads, llama.ATTN_K: config.num_key_value_heads}

    def read(self, name: str) -> torch.Tensor:
        tensor = self.tensors[name]
        values = dequantize(tensor.data, tensor.tensor_type)
        weight = torch.from_numpy(values if values.flags.writeable else values.copy())
        role = name.split(".", 3)[-1]
        return llama.interleaved_to_half_split(weight, self.heads[role]) if role in self.heads else weight


def _checked_llama(reader: GGUFReader, path: Path, architecture: str) -> LlamaConfig:
    """The config of a ``llama`` GGUF whose tensors are all of types potq expands and of the
    shapes the config needs (checked before any tensor is dequantized)."""
    if architecture != "llama":
        raise PotqError(f"{path} is a {architecture!r} GGUF; potq loads the architectures "
                        f"{', '.join(['llama', *VIA_TRANSFORMERS])}")
    config = _config(reader, path)
    for tensor in reader.tensors:
        if tensor.tensor_type not in EXPANDED_TYPES:
            supported = ", ".join(sorted(t.name for t in EXPANDED_TYPES))
            raise PotqError(f"{path}: tensor {tensor.name} is {tensor.tensor_type.name}; potq expands only "
                            f"{supported} (re-quantize the GGUF to one of them)")
    llama.check_shapes(config, {_torch_name(t.name, path): _torch_shape(t) for t in reader.tensors}, str(path))
    return config


# GGUF architectures read through transformers' own GGUF loader (``from_pretrained(gguf_file=...)``),
# which maps their tensor names, undoes llama.cpp's layouts and dequantizes every type the gguf
# package knows; potq's own loader above stays for 'llama' (it builds no float copy twice).
VIA_TRANSFORMERS = ("mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "qwen3moe")


def _load_via_transformers(reader: GGUFReader, path: Path, architecture: str) -> tuple[PreTrainedModel, Tokenizer]:
    """A non-'llama' GGUF through transformers, after potq's own checks: the header's sizes within
    the hard limits, and the float model's memory (transformers builds it whole) available."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from potq.limits import check_memory
    from potq.models.arch import check_supported
    from potq.models.hf import as_linear_layers, plain_outputs

    for key, hi in (("block_count", MAX_LAYERS), ("embedding_length", MAX_WIDTH), ("feed_forward_length", MAX_WIDTH),
                    ("attention.head_count", MAX_WIDTH)):
        _number(reader, f"{architecture}.{key}", hi)
    check_memory(3 * 4 * sum(int(t.n_elements) for t in reader.tensors), f"loading {path}")
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                     local_files_only=True, trust_remote_code=False)
        backend = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True,
                                                trust_remote_code=False)
    except Exception as exc:  # transformers' GGUF reader raises many types for a file it cannot map
        raise PotqError(f"{path}: transformers cannot read this {architecture!r} GGUF ({first_line(exc)})") from None
    check_supported(model.config.model_type, str(path))
    plain_outputs(model.config)
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", backend.bos_token_id is not None))
    tokenizer = Tokenizer(backend.backend_tokenizer, backend.bos_token_id, backend.eos_token_id, add_bos=add_bos,
                          chat_template=_chat_template(reader))
    return as_linear_layers(model).eval(), tokenizer


def _chat_template(reader: GGUFReader) -> str | None:
    """The conversation template llama.cpp's converter copies into the metadata (instruct models)."""
    template = _field(reader, "tokenizer.chat_template", None)
    return template if isinstance(template, str) else None


# Smallest encodings of a metadata entry (key length, one-byte key, type, a one-byte value) and of a
# tensor description (name length, one-byte name, dimension count, one dimension, type, offset).
_MIN_KV_BYTES, _MIN_TENSOR_BYTES = 8 + 1 + 4 + 1, 8 + 1 + 4 + 8 + 4 + 8


def _check_header(path: Path) -> None:
    """Magic, version and counts of the fixed header, before the reader loops over them: a header
    that declares 2^64-1 tensors in a 1 KB file is refused at once."""
    with path.open("rb") as stream:
        head = stream.read(24)
    size = path.stat().st_size
    if len(head) < 24 or head[:4] != b"GGUF":
        raise PotqError(f"{path} is not a readable GGUF file (no GGUF magic); give a .gguf model file")
    version, tensors, kvs = struct.unpack_from("<IQQ", head, 4)
    if version not in (2, 3):
        raise PotqError(f"{path} is GGUF version {version}; potq reads versions 2 and 3")
    if tensors * _MIN_TENSOR_BYTES + kvs * _MIN_KV_BYTES > size - 24:
        raise PotqError(f"{path} declares {tensors} tensors and {kvs} metadata entries, more than its "
                        f"{size} bytes can hold; the file is corrupt")


def _open(path: Path) -> GGUFReader:
    """The parsed file, or a one-line error for anything that is not a complete GGUF."""
    _check_header(path)
    try:
        return _FastReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, struct.error, OSError, UnicodeDecodeError,
            MemoryError) as exc:
        raise PotqError(f"{path} is not a readable GGUF file ({first_line(exc)}); "
                        "re-download or re-convert it") from None


def _torch_shape(tensor: Any) -> tuple[int, ...]:
    """A tensor's shape in torch order (GGUF lists dimensions innermost first)."""
    return tuple(int(n) for n in reversed(tensor.shape.tolist()))


def _field(reader: GGUFReader, key: str, default: Any = _REQUIRED) -> Any:
    """A metadata value, ``default`` when absent, or an error naming the missing key."""
    field = reader.fields.get(key)
    if field is not None:
        try:
            return field.contents()
        except (UnicodeDecodeError, ValueError, IndexError, TypeError) as exc:
            raise PotqError(f"{reader.data.filename}: metadata {key!r} is unreadable ({first_line(exc)}); "
                            "the file is corrupt") from None
    if default is _REQUIRED:
        raise PotqError(f"{reader.data.filename} has no {key!r} metadata; re-convert it with a current llama.cpp")
    return default


def _config(reader: GGUFReader, path: Path) -> LlamaConfig:
    """The LLaMA hyper-parameters under llama.cpp's ``llama.*`` keys, each checked to be a number
    of the right kind within the hard limits before anything is built from it."""
    dim = _number(reader, "llama.embedding_length", MAX_WIDTH)
    n_heads = _number(reader, "llama.attention.head_count", MAX_WIDTH)
    rope_dims = _number(reader, "llama.rope.dimension_count", MAX_WIDTH, None)
    if rope_dims is not None and rope_dims * n_heads != dim:
        raise PotqError(f"{path} rotates {rope_dims} dimensions of each {dim}/{n_heads}-wide head; "
                        "potq supports RoPE over the full head only")
    if _field(reader, "llama.rope.scaling.type", "none") != "none":
        raise PotqError(f"{path} uses RoPE scaling, which potq does not support; use a model without it")
    bos, eos = (_number(reader, f"tokenizer.ggml.{kind}_token_id", 2**32, None, lo=0) for kind in ("bos", "eos"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not 0 < len(tokens) <= MAX_VOCAB:
        raise PotqError(f"{path}: the vocabulary is not a list of 1 to {MAX_VOCAB} tokens; the file is corrupt")
    return llama.llama_config(
        dim=dim, hidden_dim=_number(reader, "llama.feed_forward_length", MAX_WIDTH),
        n_layers=_number(reader, "llama.block_count", MAX_LAYERS), n_heads=n_heads,
        n_kv_heads=_number(reader, "llama.attention.head_count_kv", MAX_WIDTH, n_heads),
        vocab_size=len(tokens), max_seq_len=_number(reader, "llama.context_length", MAX_POSITIONS, 2048),
        tied=not any(t.name == "output.weight" for t in reader.tensors),
        rope_theta=_positive(reader, "llama.rope.freq_base", 10000.0),
        rms_eps=_positive(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5),
        bos_id=bos, eos_id=eos,
    )


def _number(reader: GGUFReader, key: str, hi: int, default: Any = _REQUIRED, lo: int = 1) -> Any:
    """A whole-number metadata value in ``[lo, hi]`` (``default`` when absent)."""
    value = _field(reader, key, default)
    return value if value is default and default is not _REQUIRED else whole_number(
        value, key, lo, hi, str(reader.data.filename))


def _positive(reader: GGUFReader, key: str, default: float) -> float:
    """A finite positive real metadata value (``default`` when absent)."""
    value = _field(reader, key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise PotqError(f"{reader.data.filename}: {key} is {value!r}, not a positive number; the file is corrupt")
    return float(value)


def _weights(reader: GGUFReader, path: Path) -> dict[str, torch.Tensor]:
    """Every tensor as float32 under its transformers name (reader shapes are already torch order)."""
    weights = {}
    for tensor in reader.tensors:  # types and shapes were checked by load
        values = dequantize(tensor.data, tensor.tensor_type)
        weights[_torch_name(tensor.name, path)] = torch.from_numpy(
            values if values.flags.writeable else values.copy()
        )
    return weights


def _torch_name(gguf_name: str, path: Path) -> str:
    """transformers' name for a llama.cpp tensor name (``blk.3.attn_q.weight`` ...)."""
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    prefix, layer, role, suffix = (gguf_name.split(".") + ["", "", ""])[:4]
    if prefix == "blk" and layer.isdigit() and role in BLOCK_TENSORS and suffix == "weight":
        return f"model.layers.{layer}.{BLOCK_TENSORS[role]}"
    raise PotqError(f"{path} holds tensor {gguf_name!r}, which a plain LLaMA model does not have; "
                    "unsupported LLaMA variant")


def _tokenizer(reader: GGUFReader, path: Path) -> Tokenizer:
    """The vocabulary in the ``tokenizer.ggml.*`` metadata, under the key names transformers uses."""
    vocab = {
        name: _field(reader, f"tokenizer.{key}")
        for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
        if f"tokenizer.{key}" in reader.fields
    }
    # llama.cpp's default when the flag is absent: BOS for sentencepiece vocabularies, none for BPE.
    add_bos = _field(reader, "tokenizer.ggml.add_bos_token", vocab.get("tokenizer_type") == "llama")
    tokenizer = llama.vocab_tokenizer(vocab, _field(reader, "general.architecture"), vocab.get("bos_token_id"),
                                      vocab.get("eos_token_id"), bool(add_bos), str(path))
    tokenizer.chat_template = _chat_template(reader)
    if vocab.get("pre_tokenizer_type") in DIGIT_SPLIT_PRE:
        backend = tokenizer.backend
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                         backend.pre_tokenizer])
    return tokenizer
