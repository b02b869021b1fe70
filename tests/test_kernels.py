"""Exponent-add PoT dequantization is bit-identical to decode, in every output dtype."""

import pytest
import torch

import potq
from potq.errors import PotqError
from potq.formats import get_format
from potq.formats.weights import dequantize, quantize_weight
from potq.kernels.exponent_add import pot_dequantize, uniform_dequantize


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["pot", "pot-zero"])
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_exponent_add_equals_decode(name, bits, dtype):
    torch.manual_seed(bits)
    w = torch.randn(16, 200) * torch.logspace(-4, 1, 16).unsqueeze(1)  # scales from tiny to large
    fmt = get_format(name, bits)
    qw = quantize_weight(w, fmt, 64)
    reference = dequantize(qw.codes, qw.qparams(), fmt, 64).to(dtype)
    ours = pot_dequantize(qw.codes, qw.scale, fmt, 64, dtype)
    assert ours.dtype == dtype
    assert torch.equal(ours.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       reference.view(torch.int16 if dtype != torch.float32 else torch.int32))


def test_underflow_takes_the_exact_path():
    """8-bit PoT spans a·2^-127: in fp16 most of it is subnormal or zero, never garbage."""
    fmt = get_format("pot", 8)
    codes = torch.arange(0, 256, dtype=torch.uint8).reshape(1, 256)
    scales = torch.full((1, 1), 2.0 ** -10, dtype=torch.float16)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        out = pot_dequantize(codes, scales, fmt, -1, dtype).float()
        exact = (torch.where(codes >= 128, -1.0, 1.0) * 2.0 ** -10 * torch.exp2((codes.int() & 127).float() - 127))
        assert torch.equal(out, exact.to(dtype).float())
    assert (pot_dequantize(codes, scales, fmt, -1, torch.float16)[0, :20] == 0).all()  # below fp16's range


def test_uniform_baseline_and_bad_input():
    fmt = get_format("uniform", 4)
    w = torch.randn(8, 96)
    qw = quantize_weight(w, fmt, 32)
    assert torch.allclose(uniform_dequantize(qw.codes, qw.scale, qw.zero, 32), qw.dequantize(), atol=1e-6)
    with pytest.raises(PotqError, match="for the pot and pot-zero formats"):
        pot_dequantize(qw.codes, qw.scale, fmt, 32)
    with pytest.raises(PotqError, match="float32, float16 or bfloat16"):
        pot_dequantize(qw.codes, qw.scale, get_format("pot", 3), 32, torch.float64)


@pytest.mark.parametrize("name", ["pot", "pot-zero"])
@pytest.mark.parametrize("bits", [2, 3, 4, 6])
@pytest.mark.parametrize("group, in_features", [(128, 576), (32, 100), (-1, 96), (64, 1536), (16, 40), (12, 60)])
def test_fused_gemv_equals_dequantize_then_matmul(name, bits, group, in_features, fused_kernel):
    from potq.kernels.fused import ISAS, best_isa, packed_dequantize, pot_gemv, reference_gemv
    from potq.nn import QuantLinear

    torch.manual_seed(bits)
    layer = QuantLinear.from_quantized(quantize_weight(torch.randn(37, in_features), get_format(name, bits), group),
                                       torch.randn(37))
    layer.scales[0, 0] = 0.0  # a zero scale and an fp16-subnormal one take the exact table path
    layer.scales[1, -1] = 3e-7
    for isa in ISAS[best_isa()]:  # the kernel's own exponent add is bit-exact, into a new or a given tensor
        assert torch.equal(packed_dequantize(layer, isa), layer.dequantize()), isa
        out = torch.full((37, in_features), float("nan"))
        assert packed_dequantize(layer, isa, out) is out and torch.equal(out, layer.dequantize()), isa
    for batch in (1, 3, 11):
        x = torch.randn(batch, in_features)
        reference = reference_gemv(x, layer)
        for isa in ISAS[best_isa()]:
            assert torch.allclose(pot_gemv(x, layer, isa), reference, rtol=1e-5, atol=1e-4), isa


@pytest.mark.parametrize("group, in_features", [(32, 576), (32, 100), (-1, 96), (16, 40), (64, 72)])
def test_int8_gemv_equals_dequantize_then_matmul(group, in_features, fused_kernel):
    """The symmetric 8-bit GEMV (a GGUF Q8_0 table packed back, as an output head) on every ISA,
    ragged groups and row tails included; a decoding-sized input takes it inside the layer."""
    from potq.kernels import fused
    from potq.nn import QuantLinear

    torch.manual_seed(in_features)
    layer = QuantLinear.from_quantized(quantize_weight(torch.randn(29, in_features), get_format("uniform-sym", 8),
                                                       group), torch.randn(29))
    assert fused.serves_int8(layer)
    width = layer.__dict__["_int8_group"]
    for batch in (1, 4):
        x = torch.randn(batch, in_features)
        reference = fused.reference_gemv(x, layer)
        for isa in fused.ISAS[fused.best_isa()]:
            y = fused.extension().int8_gemv(x, layer.codes, layer.scales, width, isa) + layer.bias
            assert torch.allclose(y, reference, rtol=1e-5, atol=1e-4), isa
        with torch.inference_mode():
            assert torch.allclose(layer(x), reference, rtol=1e-5, atol=1e-4)
    assert not fused.serves_int8(QuantLinear.from_quantized(
        quantize_weight(torch.randn(8, 64), get_format("uniform", 8), 32)))  # asymmetric: not this kernel


@pytest.fixture
def triton_device() -> torch.device:
    """Where the Triton kernel runs: the GPU, or the CPU in Triton's interpreter (conftest.py sets
    TRITON_INTERPRET=1 where there is no GPU). Skips where Triton is not installed."""
    from potq.kernels import triton_gemv

    if triton_gemv.triton is None:
        pytest.skip("Triton is not installed (pip install 'potq[gpu]')")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("name", ["pot", "pot-zero"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group, in_features", [(128, 576), (12, 60)])
def test_triton_gemv_equals_dequantize_then_matmul(name, bits, group, in_features, triton_device):
    """The GPU kernel's exponent add is exact (one-hot inputs read the weight back bit for bit,
    zero and subnormal scales included) and its GEMV matches dequantize-then-matmul."""
    from potq.kernels import triton_gemv
    from potq.kernels.fused import reference_gemv
    from potq.nn import QuantLinear

    torch.manual_seed(bits)
    layer = QuantLinear.from_quantized(quantize_weight(torch.randn(37, in_features), get_format(name, bits), group),
                                       torch.randn(37))
    layer.scales[0, 0] = 0.0
    layer.scales[1, -1] = 3e-7
    layer.bias.zero_()
    weight = layer.dequantize()
    layer = layer.to(triton_device)
    columns = torch.cat([torch.randperm(in_features - 1)[:5], torch.tensor([0, in_features - 1])])
    one_hot = torch.eye(in_features, device=triton_device)[columns]  # the interpreter is slow: 7 columns
    assert torch.equal(triton_gemv.pot_gemv(one_hot, layer).T.cpu(), weight[:, columns])
    layer.bias.normal_()
    x = torch.randn(3, in_features, device=triton_device)
    assert torch.allclose(triton_gemv.pot_gemv(x, layer), reference_gemv(x, layer), rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_model_on_gpu_decodes_through_triton(stories, triton_device):
    """On a GPU a PoT model's decoding steps go through the Triton GEMV, with the same logits."""
    from potq.kernels import triton_gemv

    potq.quantize_(stories, potq.QuantConfig("pot", 3, 32), method="rtn", progress=False)
    ids = torch.tensor([stories.tokenizer.encode("Once upon a time")])
    with torch.inference_mode():
        reference = stories.model(ids[:, -1:]).logits
        model = stories.model.to(triton_device)
        layer = next(m for m in model.modules() if isinstance(m, potq.nn.QuantLinear))
        assert triton_gemv.serves(layer)
        assert torch.allclose(model(ids[:, -1:].to(triton_device)).logits.cpu(), reference, atol=1e-4)


def test_packed_layers_keep_no_float_weight(stories, fused_kernel):
    """A PoT model runs from its packed codes: decoding steps through the fused GEMV, a prompt
    through a per-call weight, embeddings row by row — and none of it leaves a float copy."""
    from potq.kernels import fused
    from potq.nn import QuantEmbedding, QuantLinear

    potq.quantize_(stories, potq.QuantConfig("pot", 3, 32), method="rtn", embeddings=True, progress=False)
    packed = [m for m in stories.model.modules() if isinstance(m, (QuantLinear, QuantEmbedding))]
    ids = torch.tensor([stories.tokenizer.encode("Once upon a time")])
    with torch.inference_mode(), fused.enabled(True):
        prompt_logits = stories.model(ids).logits
        step_logits = stories.model(ids[:, -1:]).logits
    assert all(m._weight is None for m in packed)
    with torch.inference_mode(), fused.enabled(False):
        assert torch.allclose(stories.model(ids).logits, prompt_logits, atol=1e-4)
        assert torch.allclose(stories.model(ids[:, -1:]).logits, step_logits, atol=1e-4)


@pytest.mark.parametrize("shape", [(1, 1, 576), (3, 5, 100), (2, 7)])
def test_kernel_rms_norm_equals_torch(shape, fused_kernel):
    import torch.nn.functional as F

    from potq.kernels import fused

    x, weight = torch.randn(shape) * 3, torch.randn(shape[-1])
    if len(shape) == 3:
        x = x.transpose(0, 1)  # not contiguous
    expected = F.rms_norm(x, (x.shape[-1],), weight, 1e-5)
    assert torch.allclose(fused.rms_norm()(x, weight, 1e-5), expected, rtol=1e-5, atol=1e-6)
    with fused.enabled(False):
        assert torch.equal(fused.rms_norm()(x, weight, 1e-5), expected)


def test_reused_prompt_weight_is_right_in_every_grad_mode(stories, fused_kernel):
    """A prompt's per-call weight goes into a reused buffer: each layer still gets its own weight,
    under inference mode, under no_grad and with gradients (where autograd keeps a fresh one)."""
    from potq.kernels import fused

    potq.quantize_(stories, potq.QuantConfig("pot", 3, 32), method="rtn", progress=False)
    ids = torch.tensor([stories.tokenizer.encode("Once upon a time there was a little girl named Lily")])
    with torch.no_grad(), fused.enabled(False):
        reference = stories.model(ids).logits
    with torch.inference_mode():
        assert torch.allclose(stories.model(ids).logits, reference, atol=1e-4)
    with torch.no_grad():
        assert torch.allclose(stories.model(ids).logits, reference, atol=1e-4)
    embeds = stories.model.get_input_embeddings()(ids).detach().requires_grad_()
    logits = stories.model(inputs_embeds=embeds).logits
    assert torch.allclose(logits, reference, atol=1e-4)
    logits.logsumexp(-1).sum().backward()
    with fused.enabled(False):
        embeds_ref = embeds.detach().clone().requires_grad_()
        stories.model(inputs_embeds=embeds_ref).logits.logsumexp(-1).sum().backward()
    assert torch.allclose(embeds.grad, embeds_ref.grad, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_benchmark_harness_computes_both_formulas_exactly(dtype, fused_kernel):
    """The dequantization benchmark's C++ harness: PoT exponent add bit-equal to potq's decode,
    uniform equal to (q − z)·s in float32 rounded once to the output dtype."""
    from potq.bench.dequant import elementwise
    from potq.kernels.exponent_add import per_weight

    if fused_kernel not in ("avx2", "avx512"):
        pytest.skip("the harness needs a CPU with AVX2 or AVX-512")
    w = torch.randn(64, 200)
    for name in ("pot", "pot-zero"):
        for bits in (2, 3, 4, 6):
            q = quantize_weight(w, get_format(name, bits), 32)
            assert torch.equal(elementwise(q, dtype), pot_dequantize(q.codes, q.scale, q.fmt, 32, dtype)), (name, bits)
    u = quantize_weight(w, get_format("uniform", 3), 32)
    expected = (u.codes.float() - per_weight(u.zero, 32, 200).float()) * per_weight(u.scale, 32, 200).float()
    assert torch.equal(elementwise(u, dtype), expected.to(dtype))


@pytest.mark.parametrize("name, bits", [("pot", 3), ("pot-zero", 2), ("pot", 6)])
def test_embedding_rows_decode_exactly(name, bits, fused_kernel):
    """A packed embedding's looked-up rows (by the kernel's exponent add, or PyTorch's decode for
    formats it does not serve) equal the rows of the decoded table, ragged last group included."""
    from potq.kernels import fused
    from potq.nn import QuantEmbedding

    torch.manual_seed(0)
    table = QuantEmbedding.from_quantized(quantize_weight(torch.randn(50, 64), get_format(name, bits), 48))
    ids = torch.tensor([[3, 0, 49], [7, 7, 1]])
    for flag in (True, False):
        with fused.enabled(flag):
            assert torch.equal(table(ids), table.dequantize()[ids]), flag
