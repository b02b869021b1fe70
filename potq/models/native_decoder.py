"""The native decoder: one C++ call per token for the LLaMA-style dense families.

:class:`NativeDecoder` describes a loaded model to the extension's ``Decoder``
(``kernels/csrc/native_decoder.cpp``) — sizes, the rotary tables the model's own rotary
embedding computes, norm weights, and one ``Matrix`` per linear layer — and then feeds it tokens:
each call runs every block, the final norm and the head in C++ on one OpenMP team, with no Python
between the layers. The families are those whose block is LLaMA's with options: Llama, Mistral,
Qwen2 (q/k/v biases), Qwen3 (per-head q/k norms), Phi-3 (fused qkv and gate/up projections, read
as row ranges; partial rotary embeddings), Gemma 2 and 3 (norms of each sublayer's output, a
scaled token table, GeGLU, soft-capped scores and logits, sliding-window layers with their own
rotary tables). Every option is read from the modules, not from a table per family: a norm's
weight is what the norm multiplies by (Gemma's ``1 + w`` found by running the norm), the
activation is recognised by running it, a layer's window and rotary tables are what its attention
module and the model's rotary embedding say. Any other model (:func:`unsupported` says why)
decodes through :class:`potq.models.llama_decoder.LlamaDecoder` or transformers' forward.

Each linear layer becomes, by its format:

- packed PoT of 2–4 bits: the **8-bit-activation PoT kernel** (``q8_kernel.cpp``: the input vector
  quantized to int8 per group, the weights' ±2^f as bytes, exact integer dot products, one float
  scale per group — llama.cpp's Q8 activations), or with ``exact=True`` the fused float kernel,
  whose result equals the PyTorch path to float rounding;
- packed APoT of 2–4 bits: the same kernel with the format's magnitudes in its byte table (exact
  mode: its float32 weight);
- symmetric 8-bit (a GGUF's Q8_0 token table kept as is): integer dot products against the same
  8-bit activations (``exact=True``: the float 8-bit GEMV);
- anything else: its float32 weight (decoded once).

The KV cache holds float16 keys and values (llama.cpp's default: a step's attention reads half
the bytes; ``exact=True``: float32). The decoder's results are logits equal to the PyTorch path's
up to the activations' 8-bit rounding and the cache's float16 rounding (exact mode: float
rounding) — tested on tiny models of each family.
"""

from __future__ import annotations

import inspect
import math
import weakref
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from potq.formats.apot import AdditivePoT
from potq.formats.grouping import group_width
from potq.formats.pot import PoT, PoTWithZero
from potq.formats.uniform import UniformSym
from potq.kernels import fused
from potq.nn.packed import PackedWeight
from potq.switch import Switch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text")

# the gated MLP's activations the decoder computes, by the name it takes
ACTIVATIONS = {"silu": F.silu, "gelu_tanh": partial(F.gelu, approximate="tanh")}

# Within `with enabled(False):` supported models decode through the Python-driven paths instead
# (`--kernel fused|torch`; POTQ_NATIVE=0 sets the default).
enabled = Switch("POTQ_NATIVE")


def unsupported(model: nn.Module) -> str | None:
    """Why ``model`` cannot decode natively here, in a few words; None where it can."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if not enabled:
        return "the native decoder is switched off"
    if kind not in FAMILIES:
        return f"the native decoder runs {', '.join(FAMILIES)} models, not {kind}"
    if fused.extension() is None:
        return "the C++ extension is not built here"
    if activation(model.model.layers[0].mlp) is None:
        return f"the native decoder's MLP activations are {' and '.join(ACTIVATIONS)}"
    if any(p.device.type != "cpu" for p in model.parameters()) or any(b.device.type != "cpu" for b in model.buffers()):
        return "the native decoder runs on the CPU"
    return None


def activation(mlp: nn.Module) -> str | None:
    """The name of the gated MLP's activation (:data:`ACTIVATIONS`), found by running it on a range
    of inputs; None when it is none of them."""
    act = getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn", None)
    if act is None:
        return None
    x = torch.linspace(-8, 8, 161)
    with torch.no_grad():
        y = act(x)
    return next((name for name, fn in ACTIVATIONS.items() if torch.allclose(y, fn(x), rtol=1e-5, atol=1e-6)), None)


class NativeDecoder:
    """Feed tokens, get the next-token logits; the C++ decoder keeps a KV cache of ``max_len``
    positions. The same interface as :class:`potq.models.llama_decoder.LlamaDecoder`."""

    def __init__(self, model: nn.Module, max_len: int, exact: bool = False) -> None:
        config, inner = model.config, model.model
        self.model, self.max_len, self.length = model, max_len, 0
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        blocks, embed, head, final_norm = _layers(model, exact)
        cos, sin = zip(*_rotary_tables(model, max_len))
        scale = getattr(inner.embed_tokens, "embed_scale", None)  # Gemma's √hidden on the looked-up rows
        self._decoder = fused.extension().Decoder(
            blocks, embed, head, final_norm, list(cos), list(sin), heads, kv_heads, _head_dim(config),
            config.rms_norm_eps, inner.layers[0].self_attn.scaling, embed_scale=1.0 if scale is None else float(scale),
            attn_softcap=getattr(config, "attn_logit_softcapping", None) or 0.0,
            final_softcap=getattr(config, "final_logit_softcapping", None) or 0.0,
            activation=activation(inner.layers[0].mlp), half_cache=not exact)
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


def _layers(model: nn.Module, exact: bool) -> tuple[list, object, object, Tensor]:
    """The model's blocks, token table, head and final norm weight as the extension describes them,
    made once per model and kind (a chat or a server builds a decoder per answer; repacking the
    codes for the 8-bit-activation kernel is worth doing once) and made again if the model's
    tensors change."""
    fingerprint = tuple(t.data_ptr() for t in [*model.parameters(), *model.buffers()])
    cache = _described.setdefault(model, {})
    if exact in cache and cache[exact][0] == fingerprint:
        return cache[exact][1]
    ext, inner, eps = fused.extension(), model.model, model.config.rms_norm_eps
    matrices: dict[tuple, object] = {}  # one Matrix per packed storage and rows: a tied head is its table

    def matrix(layer: nn.Module, rows: slice = slice(None)) -> object:
        key = (layer.codes.data_ptr() if isinstance(layer, PackedWeight) else id(layer), rows.start, rows.stop)
        if key not in matrices:
            matrices[key] = _matrix(ext, layer, exact, rows)
        return matrices[key]

    def norm(module: nn.Module | None) -> Tensor | None:
        return None if module is None else _norm_weight(module, eps)

    blocks = []
    for layer in inner.layers:
        attn, sandwich = layer.self_attn, hasattr(layer, "pre_feedforward_layernorm")
        projections = {name: matrix(*where) for name, where in _projections(layer, model.config).items()}
        blocks.append(ext.Block(
            **projections, attn_norm=norm(layer.input_layernorm),
            # Gemma names the norm before its MLP pre_feedforward and its attention's output norm post_attention
            mlp_norm=norm(layer.pre_feedforward_layernorm if sandwich else layer.post_attention_layernorm),
            attn_out_norm=norm(layer.post_attention_layernorm) if sandwich else None,
            mlp_out_norm=norm(getattr(layer, "post_feedforward_layernorm", None)),
            q_norm=norm(getattr(attn, "q_norm", None)), k_norm=norm(getattr(attn, "k_norm", None)),
            window=_window(attn, model.config)))
    layers = blocks, matrix(inner.embed_tokens), matrix(model.lm_head), norm(inner.norm)
    cache[exact] = (fingerprint, layers)
    return layers


def _projections(layer: nn.Module, config) -> dict[str, tuple[nn.Module, slice]]:  # noqa: ANN001
    """Each projection the decoder reads as (linear layer, its rows): Phi-3's fused qkv and gate/up
    projections are row ranges of one layer."""
    attn, mlp = layer.self_attn, layer.mlp
    whole = slice(None)
    if hasattr(attn, "qkv_proj"):
        q, kv = config.num_attention_heads * _head_dim(config), config.num_key_value_heads * _head_dim(config)
        qkv = {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv)}
        where = {name: (attn.qkv_proj, rows) for name, rows in qkv.items()}
    else:
        where = {"q": (attn.q_proj, whole), "k": (attn.k_proj, whole), "v": (attn.v_proj, whole)}
    where["o"] = (attn.o_proj, whole)
    if hasattr(mlp, "gate_up_proj"):
        half = mlp.gate_up_proj.out_features // 2
        where |= {"gate": (mlp.gate_up_proj, slice(0, half)), "up": (mlp.gate_up_proj, slice(half, 2 * half))}
    else:
        where |= {"gate": (mlp.gate_proj, whole), "up": (mlp.up_proj, whole)}
    where["down"] = (mlp.down_proj, whole)
    return where


def _head_dim(config) -> int:  # noqa: ANN001
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _window(attn: nn.Module, config) -> int:  # noqa: ANN001
    """The positions a layer attends to (0: all): its attention module's own window where it keeps
    one (Qwen2/3 and Gemma by layer type), else the model's (Mistral, Phi-3)."""
    window = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(config, "sliding_window", None)
    return int(window or 0)


def _norm_weight(norm: nn.Module, eps: float) -> Tensor:
    """What the RMSNorm ``norm`` multiplies the normalised vector by — its weight, or Gemma's
    ``1 + weight`` — found by running it on a vector of ones (whose RMS is 1), and checked on an
    uneven vector: a norm of another kind raises rather than decoding wrongly."""
    weight = norm.weight
    with torch.no_grad():
        ones = torch.ones(1, weight.numel(), dtype=weight.dtype)
        effective = (norm(ones)[0].float() * math.sqrt(1.0 + eps)).contiguous()
        x = torch.randn(2, weight.numel(), generator=torch.Generator().manual_seed(0)) + 1.0
        expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * effective
        if not torch.allclose(norm(x.to(weight.dtype)).float(), expected, rtol=1e-2, atol=1e-3):
            raise ValueError(f"{type(norm).__name__} is not an RMSNorm the native decoder computes")
    return effective


def _rotary_tables(model: nn.Module, max_len: int) -> list[tuple[Tensor, Tensor]]:
    """Each block's rotary tables (cos, sin with its first half negated: rotate_half(x)·sin is
    halves-swapped(x)·that) for ``max_len`` positions, from the model's own rotary embedding — per
    layer type where it keeps one per type (Gemma 3's local and global bases); blocks of a type
    share one pair."""
    inner = model.model
    rotary = inner.rotary_emb
    per_type = "layer_type" in inspect.signature(rotary.forward).parameters
    tables: dict[object, tuple[Tensor, Tensor]] = {}
    out = []
    with torch.no_grad():
        probe, positions = torch.zeros(1, dtype=torch.float32), torch.arange(max_len)[None]
        for layer in inner.layers:
            kind = getattr(layer.self_attn, "layer_type", None) if per_type else None
            if kind not in tables:
                cos, sin = rotary(probe, positions, kind) if per_type else rotary(probe, positions)
                half = cos.shape[-1] // 2
                tables[kind] = (_f32(cos[0]), _f32(torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)))
            out.append(tables[kind])
    return out


def _f32(t: Tensor) -> Tensor:
    return t.detach().float().contiguous()


def layer_matrix(layer: nn.Module) -> object:
    """``layer`` as the decoder runs it (the extension's ``Matrix``; ``.gemv(x)`` runs it alone, on
    the calling thread): what the speed benchmark times apart from a whole step."""
    return _matrix(fused.extension(), layer, False)


def _matrix(ext, layer: nn.Module, exact: bool, rows: slice = slice(None)) -> object:  # noqa: ANN001
    """Rows ``rows`` of ``layer`` (a linear layer or a token table, packed or float) as the
    extension's ``Matrix``."""
    bias = getattr(layer, "bias", None)
    bias = None if bias is None else _f32(bias[rows])
    if isinstance(layer, PackedWeight):
        fmt, width = layer.fmt, group_width(layer.in_features, layer.group_size)
        codes, scales = layer.codes[rows].contiguous(), layer.scales[rows].contiguous()
        if isinstance(fmt, PoT) and fmt.bits <= 4:
            return ext.pot_matrix(codes, scales, layer.in_features, fmt.bits, width, fmt.top_exponent,
                                  isinstance(fmt, PoTWithZero), bias, not exact)
        if isinstance(fmt, AdditivePoT) and not exact and ext.q8_serves(fmt.bits, width, layer.in_features):
            return ext.pot_matrix(codes, scales, layer.in_features, fmt.bits, width, 0, False, bias,
                                  magnitudes=list(fmt.magnitudes))
        if isinstance(fmt, UniformSym) and fmt.bits == 8:
            return ext.int8_matrix(codes, scales, width, bias, not exact)
        weight = layer.dequantize()
    else:
        weight = layer.weight
    return ext.dense_matrix(_f32(weight[rows]), bias)
