"""The native decoder (one C++ call per token) against transformers' own forward, on tiny models of
every family it runs (each family's options — sliding windows, soft-capping, Gemma's norms,
partial rotary — switched on where a tiny default config leaves them off) and on the real
stories260K: exact mode to float rounding, the default 8-bit-activation mode within the
activations' rounding and with the same greedy tokens."""

import copy

import pytest
import torch

import potq
from potq.config import QuantConfig
from potq.eval.generate import next_tokens
from potq.formats.grouping import group_width
from potq.models import native_decoder
from potq.models.native_decoder import NativeDecoder
from potq.quantize import INT8_TABLES
from zoo import tiny_model

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text"]

# each family's options that its tiny default config leaves off or makes irrelevant at 14 tokens
OPTIONS = {
    "mistral": dict(sliding_window=4),
    "phi3": dict(sliding_window=6, rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
    "gemma2": dict(sliding_window=5, attn_logit_softcapping=0.05, final_logit_softcapping=0.5),
    "gemma3_text": dict(sliding_window=5, layer_types=["sliding_attention", "full_attention"]),  # two rotary bases
    "qwen2": dict(use_sliding_window=True, sliding_window=3, layer_types=["full_attention", "sliding_attention"]),
}


def _logits(model, ids):
    with torch.inference_mode():
        return model(ids).logits[0]


def _native(model, ids, split, exact):
    """The native decoder's logits after ids[:split] (one batched prompt) and after each later token."""
    decoder = NativeDecoder(model, ids.shape[1], exact=exact)
    rows = [decoder(ids[:, :split])]
    rows += [decoder(ids[:, t:t + 1]) for t in range(split, ids.shape[1])]
    return torch.stack(rows)


def _greedy(model, prompt, steps):
    with torch.inference_mode():
        return list(next_tokens(model, prompt, steps, lambda logits: int(logits.argmax())))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fmt, bits", [("pot", 3), ("pot", 4), ("pot", 2), ("pot-zero", 3), ("apot", 2), ("apot", 4)])
def test_native_logits_match_transformers(fused_kernel, family, fmt, bits):
    model = tiny_model(family)
    potq.quantize_(model, QuantConfig(fmt, bits, 32), method="rtn", progress=False)
    assert native_decoder.unsupported(model) is None
    ids = torch.randint(0, 512, (1, 14), generator=torch.Generator().manual_seed(1))
    reference = _logits(model, ids)[9:]
    exact = _native(model, ids, 10, exact=True)
    assert torch.allclose(exact, reference, atol=2e-5, rtol=1e-4)
    fast = _native(model, ids, 10, exact=False)  # int8 activations: within their rounding, not exact
    error = (fast - reference).abs().max() / reference.abs().max()
    assert 0 < error < 0.03


@pytest.mark.parametrize("family", OPTIONS)
def test_native_block_options(fused_kernel, family):
    """Sliding windows shorter than the text, soft-capped scores and logits, per-layer-type rotary
    bases, partial rotary embeddings, norms that are not 1 (Gemma's 1 + w): the same logits as
    transformers, prompt and steps, on two threads, float and packed — and the options change those
    logits, so the comparison covers them. (The 8-bit-activation mode of each family is checked
    in the test above; with Gemma's norms of each sublayer's output its rounding reaches the
    residual stream at full size rather than diluted, so its bound there would be another one.)"""
    model, plain = tiny_model(family, **OPTIONS[family]), tiny_model(family)
    with torch.no_grad():
        for name, p in [*model.named_parameters(), *plain.named_parameters()]:
            if "norm" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
    ids = torch.randint(0, 512, (1, 14), generator=torch.Generator().manual_seed(1))
    reference = _logits(model, ids)
    assert (reference - _logits(plain, ids)).abs().max() > 0.05
    potq.quantize_(packed := copy.deepcopy(model), QuantConfig("pot", 3, 32), method="rtn", progress=False)
    packed_reference = _logits(packed, ids)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for split in (10, 1):
            assert torch.allclose(_native(model, ids, split, exact=True), reference[split - 1:], atol=2e-5, rtol=1e-4)
            half = _native(model, ids, split, exact=False)  # the float16 cache, windows included
            assert (half - reference[split - 1:]).abs().max() / reference.abs().max() < 2e-3
            assert torch.allclose(_native(packed, ids, split, exact=True), packed_reference[split - 1:],
                                  atol=2e-5, rtol=1e-4)  # packed rows (Phi-3's fused projections: row ranges)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_decoding_splits_the_positions_between_threads(fused_kernel, threads, head_dim):
    """One token at a time from the very first (a thread's share of the positions empty at first,
    the shares merged by their softmax statistics after): the same logits on any number of threads,
    for heads of 64 and 128 values (the AVX-512 attention's, 16 positions at a time: 40 tokens
    make whole and partial blocks) as for others; and the default float16 KV cache within its
    rounding of the exact float32 one, decoding and reading a prompt."""
    model = tiny_model("qwen3", head_dim=head_dim)  # q/k norms too, normed by each thread for itself
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(3))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        native = _native(model, ids, 1, exact=True)
        half = _native(model, ids, 1, exact=False)  # a float model: only the float16 KV cache differs
        prompt = _native(model, ids, 25, exact=False)  # a prompt's attention over the float16 cache
    finally:
        torch.set_num_threads(before)
    assert torch.allclose(native, _logits(model, ids), atol=2e-5, rtol=1e-4)
    scale = native.abs().max()
    assert 0 < (half - native).abs().max() / scale < 2e-3
    assert 0 < (prompt - native[24:]).abs().max() / scale < 2e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_native_float_and_int8_layers(fused_kernel, family):
    """A float model (its float layers exact; by default only the float16 KV cache rounds), and
    one whose token table and tied head are symmetric 8-bit."""
    model = tiny_model(family)
    ids = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(2))
    reference = _logits(model, ids)[5:]
    assert torch.allclose(_native(model, ids, 6, exact=True), reference, atol=2e-5, rtol=1e-4)
    assert (_native(model, ids, 6, exact=False) - reference).abs().max() / reference.abs().max() < 2e-3
    potq.quantize_(model, QuantConfig("pot", 4, 32), method="rtn", embeddings=INT8_TABLES, progress=False)
    reference = _logits(model, ids)[5:]
    assert torch.allclose(_native(model, ids, 6, exact=True), reference, atol=2e-5, rtol=1e-4)
    error = (_native(model, ids, 6, exact=False) - reference).abs().max() / reference.abs().max()
    assert error < 0.03


def test_native_greedy_tokens_on_a_real_model(fused_kernel, stories):
    """stories260K at 4 bits (its 172-wide MLP input takes the exact kernel, the rest 8-bit
    activations): the default path writes the same greedy story as transformers' forward."""
    potq.quantize_(stories, QuantConfig("pot", 4, 32), method="rtn", progress=False)
    prompt = stories.tokenizer.encode("Once upon a time, there was a little girl")
    native = _greedy(stories.model, prompt, 40)
    with native_decoder.enabled(False):
        assert native == _greedy(stories.model, prompt, 40)


def test_the_layers_are_described_once_per_model(fused_kernel, stories):
    potq.quantize_(stories, QuantConfig("pot", 3, 32), method="rtn", progress=False)
    first = native_decoder._layers(stories.model, False)
    assert native_decoder._layers(stories.model, False) is first  # a chat's next answer reuses them
    stories.model.model.layers[0].mlp.up_proj.codes = stories.model.model.layers[0].mlp.up_proj.codes.clone()
    assert native_decoder._layers(stories.model, False) is not first  # changed tensors: described again


def test_the_profile_adds_up_a_steps_phases_and_changes_nothing(fused_kernel, stories):
    """Decoder.profile: the same logits with the clock on; every phase's time is charged (the
    layers' products and the head above zero), and the phases add up to no more than the calls took."""
    import time

    potq.quantize_(stories, QuantConfig("pot", 3, 32), method="rtn", progress=False)
    ids = torch.tensor([stories.tokenizer.encode("Once upon a time, there was a little girl")])
    decoder = NativeDecoder(stories.model, ids.shape[1] + 1)
    decoder(ids)
    native, at = decoder._decoder, ids.shape[1]
    plain, profiled = torch.empty(stories.model.lm_head.out_features), torch.empty(stories.model.lm_head.out_features)
    native.feed([5], at, plain)
    native.profile(True)
    start = time.perf_counter()
    for _ in range(20):
        native.feed([5], at, profiled)
    wall_ms = (time.perf_counter() - start) * 1e3
    native.profile(False)
    phases = native.phase_ms()
    assert torch.equal(plain, profiled)
    assert set(phases) == {"projections", "attention", "elementwise", "waiting", "output head"}
    assert phases["projections"] > 0 and phases["output head"] > 0 and min(phases.values()) >= 0
    assert sum(phases.values()) <= wall_ms
    native.profile(True)  # afresh
    assert sum(native.phase_ms().values()) == 0


def test_bounds_and_fallbacks(fused_kernel):
    model = tiny_model("llama")
    decoder = NativeDecoder(model, 4)
    decoder(torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match="holds 4 positions"):
        decoder(torch.tensor([[4, 5]]))
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        NativeDecoder(model, 4)(torch.tensor([[600]]))
    gpt2 = tiny_model("gpt2")
    assert "not gpt2" in native_decoder.unsupported(gpt2)
    assert len(_greedy(gpt2, [1, 5, 7], 3)) == 3  # falls back to transformers' forward
    assert "activations are silu and gelu_tanh" in native_decoder.unsupported(tiny_model("llama", hidden_act="relu"))
    with native_decoder.enabled(False):
        assert native_decoder.unsupported(model) == "the native decoder is switched off"


def test_native_perplexity_is_what_generate_computes(fused_kernel, stories, story_text):
    """`potq eval --kernel native`: every window's logits from the native decoder; exact mode
    equals the PyTorch forward's perplexity, the default (8-bit activations) is close to it."""
    from potq.eval import perplexity

    potq.quantize_(stories, QuantConfig("pot", 3, 32), method="rtn", progress=False)
    model, tokenizer = stories.model, stories.tokenizer
    reference = perplexity(model, tokenizer, "tinystories", ctx=128, max_windows=3, text=story_text, progress=False)
    native = perplexity(model, tokenizer, "tinystories", ctx=128, max_windows=3, text=story_text, progress=False,
                        native=True)
    assert native.path == "native" and reference.path == "pytorch"
    assert abs(native.ppl / reference.ppl - 1) < 0.02
    window = torch.tensor([tokenizer.encode(story_text)[:128]])
    every = NativeDecoder(model, 128, exact=True).every_logits(window)
    # float32 rounding of two summation orders over a 128-token window: about 3e-5 on logits near 15
    assert torch.allclose(every, _logits(model, window), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_one_layer_of_each_width(fused_kernel, bits):
    """One packed layer alone (128 inputs, four groups): the exact kernel equals its PyTorch
    forward, the 8-bit-activation kernel is within the input's 8-bit rounding of it."""
    from potq.kernels import fused

    model = tiny_model("llama")
    potq.quantize_(model, QuantConfig("pot", bits, 32), method="rtn", progress=False)
    layer = model.model.layers[0].mlp.down_proj  # 128 -> 64
    x = torch.randn(layer.in_features)
    with torch.inference_mode():
        reference = layer(x[None])[0]
    exact = native_decoder._matrix(fused.extension(), layer, exact=True)
    fast = native_decoder._matrix(fused.extension(), layer, exact=False)
    assert (exact.kind, fast.kind) == (1, 3)  # the fused float kernel; the 8-bit-activation kernel
    assert torch.allclose(exact.gemv(x), reference, atol=1e-5)
    assert (fast.gemv(x) - reference).abs().max() < 0.02 * reference.abs().max()


def test_a_mixed_width_model_runs_natively_layer_by_layer(fused_kernel, stories):
    """A bit budget gives layers 2-, 3-, 4-bit PoT or int8 grids: the native decoder reads each
    layer's own, exactly the transformers forward's logits."""
    from potq.eval.data import calibration_batch
    from potq.nn import QuantLinear

    calib = calibration_batch(stories.tokenizer, 4, 64, seed=0)
    potq.quantize_(stories, QuantConfig("pot", 2, 32), method="grid", calibration=calib, progress=False, bpw=3.0)
    widths = {(type(m.fmt).__name__, m.fmt.bits) for m in stories.model.modules() if isinstance(m, QuantLinear)}
    assert len(widths) > 1
    assert native_decoder.unsupported(stories.model) is None
    ids = calib[:1, :12]
    assert torch.allclose(_native(stories.model, ids, 8, exact=True), _logits(stories.model, ids)[7:],
                          atol=2e-5, rtol=1e-4)


def _q8_reference(layer, x):
    """Σ over groups of (integer weights · int8 activations) · scales, in float64: what every
    8-bit-activation kernel computes in exact integer sums (x rounded to int8 per group as they
    round it: x · (1 / (max|x| / 127)) in float32, to nearest even)."""
    width = group_width(layer.in_features, layer.group_size)
    weight = layer.dequantize().double()
    y = torch.zeros(x.shape[0], layer.out_features, dtype=torch.float64)
    for start in range(0, layer.in_features, width):
        block = x[:, start:start + width]
        scale = block.abs().amax(dim=1, keepdim=True) / 127
        q = torch.round(block * torch.where(scale > 0, 1 / scale, 0.0))
        y += (q.double() * scale.double()) @ weight[:, start:start + width].T
    return y


@pytest.mark.parametrize("fmt, bits", [("pot", 2), ("pot", 3), ("pot", 4), ("pot-zero", 3), ("uniform-sym", 8),
                                       ("apot", 2), ("apot", 3), ("apot", 4)])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_every_8_bit_activation_kernel_computes_the_same_sums(fused_kernel, fmt, bits, group):
    """The scalar, AVX2 and (where the CPU has it) AVX-512 VNNI kernels, each in its own layout —
    VNNI's rows interleaved in fours, its offset operand corrected per group — give the exact
    integer sums of the reference for one token and for prompts of 4, 8 and 13 (the four-token and
    four-row loops and their tails), 37 rows (not a multiple of 4), a ragged last group. APoT
    layers are the same kernels with the format's magnitudes in their byte tables."""
    from potq.formats import get_format
    from potq.formats.pot import PoTWithZero
    from potq.kernels import fused
    from potq.nn import QuantLinear
    from potq.quantize import quantize_weight

    ext, isas = fused.extension(), ["scalar", "avx2", "vnni"][:fused.extension().q8_best_isa() + 1]
    torch.manual_seed(group + bits)
    for in_features in (576, 1536):
        layer = QuantLinear.from_quantized(quantize_weight(torch.randn(37, in_features), get_format(fmt, bits), group))
        width = group_width(in_features, layer.group_size)
        def matrix_for(isa: str):  # noqa: ANN202
            if fmt == "uniform-sym":
                return ext.int8_matrix(layer.codes, layer.scales, width, None, True, isa)
            if fmt == "apot":
                return ext.pot_matrix(layer.codes, layer.scales, in_features, bits, width, 0, False, None, True, isa,
                                      magnitudes=list(layer.fmt.magnitudes))
            return ext.pot_matrix(layer.codes, layer.scales, in_features, bits, width, layer.fmt.top_exponent,
                                  isinstance(layer.fmt, PoTWithZero), None, True, isa)

        for name in isas:
            matrix = matrix_for(name)
            assert matrix.isa <= isas.index(name)  # VNNI takes layers of whole 64s; others the AVX2 loop
            for rows in (1, 4, 8, 13):
                x = torch.randn(rows, in_features)
                assert torch.allclose(matrix.gemv(x).double(), _q8_reference(layer, x), rtol=1e-5, atol=1e-4), (name, rows)
    with pytest.raises(RuntimeError, match="not avx9"):
        matrix_for("avx9")
    if fmt == "apot":  # the float kernels decode 2^f: a table of magnitudes is refused there
        with pytest.raises(RuntimeError, match="needs the 8-bit-activation kernel"):
            ext.pot_matrix(layer.codes, layer.scales, in_features, bits, width, 0, False, None, False,
                           magnitudes=list(layer.fmt.magnitudes))
