"""Exponent-add PoT dequantization is bit-identical to decode, in every output dtype."""

import pytest
import torch

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
@pytest.mark.parametrize("group, in_features", [(128, 576), (32, 100), (-1, 96), (64, 1536), (16, 40)])
def test_fused_gemv_equals_dequantize_then_matmul(name, bits, group, in_features):
    from potq.kernels.fused import ISAS, best_isa, pot_gemv, reference_gemv
    from potq.nn import QuantLinear

    if best_isa() == "none":
        pytest.skip("no C++ compiler: the fused kernel is not built here")
    torch.manual_seed(bits)
    layer = QuantLinear.from_quantized(quantize_weight(torch.randn(37, in_features), get_format(name, bits), group),
                                       torch.randn(37))
    for batch in (1, 3, 11):  # 11 > the kernel's 8 rows per pass
        x = torch.randn(batch, in_features)
        reference = reference_gemv(x, layer)
        for isa in ISAS[best_isa()]:
            assert torch.allclose(pot_gemv(x, layer, isa), reference, rtol=1e-5, atol=1e-4), isa
