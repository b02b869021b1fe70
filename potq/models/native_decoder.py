"""The native decoder: one C++ call per token for the LLaMA-style dense families.

:class:`NativeDecoder` describes a loaded model to the extension's ``Decoder``
(``kernels/csrc/native_decoder.cpp``) — sizes, the rotary tables the model's own rotary
embedding computes, norm weights, and one ``Matrix`` per linear layer — and then feeds it tokens:
each call runs every block, the final norm and the head in C++ on one OpenMP team, with no Python
between the layers. The families are those whose block is LLaMA's: Llama, Mistral, Qwen2 (q/k/v
biases) and Qwen3 (per-head q/k norms); they differ only in which optional weights they carry,
read from the modules, not from a table per family. Any other model (:func:`unsupported` says
why) decodes through :class:`potq.models.llama_decoder.LlamaDecoder` or transformers' forward.

Each linear layer becomes, by its format:

- packed PoT of 2–4 bits: the **8-bit-activation PoT kernel** (``q8_kernel.cpp``: the input vector
  quantized to int8 per group, the weights' ±2^f as bytes, exact integer dot products, one float
  scale per group — llama.cpp's Q8 activations), or with ``exact=True`` the fused float kernel,
  whose result equals the PyTorch path to float rounding;
- symmetric 8-bit (a GGUF's Q8_0 token table kept as is): integer dot products against the same
  8-bit activations (``exact=True``: the float 8-bit GEMV);
- anything else: its float32 weight (decoded once).

The decoder's results are logits equal to the PyTorch path's up to the activations' 8-bit
rounding (exact mode: float rounding) — tested on tiny models of each family.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from potq.formats.grouping import group_width
from potq.formats.pot import PoT, PoTWithZero
from potq.formats.uniform import UniformSym
from potq.kernels import fused
from potq.nn.packed import PackedWeight
from potq.switch import Switch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

# Within `with enabled(False):` supported models decode through the Python-driven paths instead
# (`--kernel fused|torch`; POTQ_NATIVE=0 sets the default).
enabled = Switch("POTQ_NATIVE")


def unsupported(model: nn.Module, max_len: int | None = None) -> str | None:
    """Why ``model`` cannot decode natively here (for ``max_len`` positions), in a few words;
    None where it can."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if not enabled:
        return "the native decoder is switched off"
    if kind not in FAMILIES:
        return f"the native decoder runs {', '.join(FAMILIES)} models, not {kind}"
    if fused.extension() is None:
        return "the C++ extension is not built here"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"the native decoder runs SwiGLU blocks, not {config.hidden_act}"
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", kind == "mistral") else None
    if window and (max_len is None or max_len > window):
        return f"sliding-window attention (beyond {window} positions) is not in the native decoder"
    if any(p.device.type != "cpu" for p in model.parameters()) or any(b.device.type != "cpu" for b in model.buffers()):
        return "the native decoder runs on the CPU"
    return None


class NativeDecoder:
    """Feed tokens, get the next-token logits; the C++ decoder keeps a KV cache of ``max_len``
    positions. The same interface as :class:`potq.models.llama_decoder.LlamaDecoder`."""

    def __init__(self, model: nn.Module, max_len: int, exact: bool = False) -> None:
        config, inner = model.config, model.model
        self.model, self.max_len, self.length = model, max_len, 0
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        blocks, embed, head = _layers(model, exact)
        with torch.no_grad():
            probe = torch.zeros(1, dtype=torch.float32)
            cos, sin = inner.rotary_emb(probe, torch.arange(max_len)[None])
            half = head_dim // 2  # rotate_half(x)·sin = halves-swapped(x)·(sin, first half negated)
            signed_sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        self._decoder = fused.extension().Decoder(
            blocks, embed, head, _f32(inner.norm.weight), _f32(cos[0]), _f32(signed_sin[0]), heads, kv_heads,
            config.rms_norm_eps, inner.layers[0].self_attn.scaling)
        self._logits = torch.empty(model.lm_head.out_features)

    def __call__(self, ids: Tensor) -> Tensor:
        """Logits ``[vocab]`` after the tokens ``ids`` (``[1, T]``) following those fed before."""
        tokens = ids[0].tolist()
        if self.length + len(tokens) > self.max_len:
            raise ValueError(f"the decoder holds {self.max_len} positions")
        self._decoder.feed(tokens, self.length, self._logits)
        self.length += len(tokens)
        return self._logits.clone()

    def every_logits(self, ids: Tensor) -> Tensor:
        """Logits ``[T, vocab]`` after each of the tokens ``ids`` (``[1, T]``) fed from position 0
        (the cache starts afresh): a perplexity window, computed as ``potq generate`` computes."""
        tokens = ids[0].tolist()
        if len(tokens) > self.max_len:
            raise ValueError(f"the decoder holds {self.max_len} positions")
        logits = torch.empty(len(tokens), self._logits.numel())
        self._decoder.feed(tokens, 0, logits)
        self.length = len(tokens)
        return logits


def describe(model: nn.Module, exact: bool = False) -> None:
    """Describe ``model`` to the extension now (repacking its codes for the 8-bit-activation
    kernel), not at its first token — what a server or a benchmark does once at load time."""
    _layers(model, exact)


# model -> {exact: (its tensors' addresses, its description)}; held beside the model, not in it,
# so that the model still copies and pickles
_described: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _layers(model: nn.Module, exact: bool) -> tuple[list, object, object]:
    """The model's blocks, token table and head as the extension describes them, made once per
    model and kind (a chat or a server builds a decoder per answer; repacking the codes for the
    8-bit-activation kernel is worth doing once) and made again if the model's tensors change."""
    fingerprint = tuple(t.data_ptr() for t in [*model.parameters(), *model.buffers()])
    cache = _described.setdefault(model, {})
    if exact in cache and cache[exact][0] == fingerprint:
        return cache[exact][1]
    ext, inner = fused.extension(), model.model
    matrices: dict[int, object] = {}  # one Matrix per packed storage: a tied head is its table

    def matrix(layer: nn.Module) -> object:
        key = layer.codes.data_ptr() if isinstance(layer, PackedWeight) else id(layer)
        if key not in matrices:
            matrices[key] = _matrix(ext, layer, exact)
        return matrices[key]

    blocks = []
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        blocks.append(ext.Block(
            matrix(attn.q_proj), matrix(attn.k_proj), matrix(attn.v_proj), matrix(attn.o_proj),
            matrix(mlp.gate_proj), matrix(mlp.up_proj), matrix(mlp.down_proj),
            _f32(layer.input_layernorm.weight), _f32(layer.post_attention_layernorm.weight),
            None if q_norm is None else _f32(q_norm.weight), None if k_norm is None else _f32(k_norm.weight)))
    layers = blocks, matrix(inner.embed_tokens), matrix(model.lm_head)
    cache[exact] = (fingerprint, layers)
    return layers


def _f32(t: Tensor) -> Tensor:
    return t.detach().float().contiguous()


def _matrix(ext, layer: nn.Module, exact: bool) -> object:  # noqa: ANN001
    """``layer`` (a linear layer or a token table, packed or float) as the extension's ``Matrix``."""
    bias = getattr(layer, "bias", None)
    bias = None if bias is None else _f32(bias)
    if isinstance(layer, PackedWeight):
        fmt, width = layer.fmt, group_width(layer.in_features, layer.group_size)
        if isinstance(fmt, PoT) and fmt.bits <= 4:
            return ext.pot_matrix(layer.codes, layer.scales, layer.in_features, fmt.bits, width, fmt.top_exponent,
                                  isinstance(fmt, PoTWithZero), bias, not exact)
        if isinstance(fmt, UniformSym) and fmt.bits == 8:
            return ext.int8_matrix(layer.codes, layer.scales, width, bias, not exact)
        weight = layer.dequantize()
    else:
        weight = layer.weight
    return ext.dense_matrix(_f32(weight), bias)
