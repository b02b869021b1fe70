"""Formats, grouping and bit packing against hand-computed values."""

import math

import pytest
import torch

from potq.config import PoTConfig, QuantConfig, UniformConfig
from potq.errors import PotqError
from potq.formats import FORMATS, QParams, get_format
from potq.formats.grouping import to_groups
from potq.formats.packing import pack_bits, packed_row_bytes, unpack_bits
from potq.formats.weights import dequantize, fake_quantize, init_qparams, quantize_weight

W = torch.tensor([[[1.0, -0.3, 0.1, 0.6]]])  # one row, one group of 4


def _roundtrip(name: str, bits: int, w: torch.Tensor = W) -> tuple[torch.Tensor, torch.Tensor, QParams]:
    fmt = get_format(name, bits)
    qp = fmt.as_stored(fmt.init_qparams(w))
    codes = fmt.encode(w, qp)
    return codes, fmt.decode(codes, qp), qp


def test_pot3_zero_excluded_by_hand():
    # a = max|w| = 1 -> levels ±{1, 1/2, 1/4, 1/8}; exponents rounded in the log2 domain (thesis 3.4):
    # log2 .3 = -1.74 -> -2, log2 .1 = -3.32 -> -3, log2 .6 = -0.74 -> -1.
    codes, deq, qp = _roundtrip("pot", 3)
    assert deq.flatten().tolist() == [1.0, -0.25, 0.125, 0.5]
    # code = sign bit (4) | exponent field e, e being the thesis' exponent of s0 = max/2^3.
    assert codes.flatten().tolist() == [3, 4 | 1, 0, 2]
    assert qp.scale.item() == 1.0


def test_pot3_with_zero_by_hand():
    # K = 2: levels {0, ±1/4, ±1/2, ±1}; 0.1 rounds below 1/4 in log2 -> zero (field 0).
    codes, deq, _ = _roundtrip("pot-zero", 3)
    assert deq.flatten().tolist() == [1.0, -0.25, 0.0, 0.5]
    assert codes.flatten().tolist() == [3, 4 | 1, 0, 2]


def test_apot_by_hand():
    # 3 bits: magnitudes {1, 3, 5, 8}/8 -> levels ±{1/8, 3/8, 5/8, 1}, nearest in value (linear
    # midpoints): .3 -> 3/8 (midpoints 1/4, 1/2), .1 -> 1/8, .6 -> 5/8 (midpoint 13/16 above it).
    codes, deq, qp = _roundtrip("apot", 3)
    assert deq.flatten().tolist() == [1.0, -0.375, 0.125, 0.625]
    assert codes.flatten().tolist() == [3, 4 | 1, 0, 2]  # sign bit | index
    # 2 bits is PoT with the exponents 0 and -2; 4 bits sums of two powers of two up to 16
    assert get_format("apot", 2).levels(QParams(torch.ones(1, 1))).flatten().tolist() == [0.25, 1.0, -0.25, -1.0]
    four = get_format("apot", 4).levels(QParams(torch.ones(1, 1))).flatten()[:8] * 16
    assert four.tolist() == [1, 2, 4, 6, 8, 10, 12, 16] and all(bin(int(m)).count("1") <= 2 for m in four)


def test_apot_gradient_reaches_weights_and_scale():
    # blockap's "lsq" gradient: the weight's slope is the ratio of the neighbouring level gaps
    # (1 inside evenly spaced levels), the scale's the held level
    fmt = get_format("apot", 4)
    w = torch.tensor([[[0.55, -0.3, 0.9, 0.02]]], requires_grad=True)
    scale = torch.ones(1, 1, requires_grad=True)
    fmt.fake_quant(w, QParams(scale), grad="lsq").sum().backward()
    assert w.grad.flatten().tolist() == pytest.approx([1.0, 1.0, 1.0, 0.0])  # below the lowest level: clamped
    assert scale.grad.item() == pytest.approx(0.5 - 0.25 + 1.0 + 0.0625)  # Σ sign·level


def test_uniform_asym2_by_hand():
    codes, deq, qp = _roundtrip("uniform", 2)
    s = qp.scale.item()
    assert s == pytest.approx(1.3 / 3, rel=1e-3)  # fp16-rounded (max - min) / 3
    assert qp.zero.item() == 1  # round(0.3 / s)
    assert codes.flatten().tolist() == [3, 0, 1, 2]
    assert deq.flatten().tolist() == pytest.approx([2 * s, -s, 0.0, s])


def test_uniform_sym3_by_hand():
    codes, deq, qp = _roundtrip("uniform-sym", 3)
    s = qp.scale.item()
    assert s == pytest.approx(1 / 3, rel=1e-3)
    assert deq.flatten().tolist() == pytest.approx([3 * s, -s, 0.0, 2 * s])
    assert codes.flatten().tolist() == [6, 2, 3, 5]  # q + 3


@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize("bits", range(2, 9))
def test_every_code_is_a_grid_level(name, bits):
    torch.manual_seed(bits)
    w = torch.randn(16, 100) * torch.rand(16, 1)
    cls = FORMATS[name]
    if not cls.min_bits <= bits <= cls.max_bits:
        with pytest.raises(PotqError, match=f"{name} bits must be an integer from {cls.min_bits} to {cls.max_bits}"):
            get_format(name, bits)
        return
    fmt = get_format(name, bits)
    qw = quantize_weight(w, fmt, 32)
    assert int(qw.codes.max()) < 2**bits
    deq = to_groups(qw.dequantize(), 32)
    levels = fmt.levels(qw.qparams())  # [rows, groups, 2**bits]
    hit = (deq.unsqueeze(-1) == levels.unsqueeze(-2)).any(-1)
    assert hit[:, :-1].all() and hit[:, -1, :100 - 3 * 32].all()  # padding of the last group excluded
    assert torch.isfinite(deq).all()
    # fake quantization is exactly decode(encode(.))
    fq = fake_quantize(w, fmt, 32, qw.qparams())
    assert torch.equal(fq, qw.dequantize())


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n", [1, 5, 13, 64, 171])
def test_pack_unpack_roundtrip(bits, n):
    codes = torch.randint(0, 2**bits, (7, n), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.shape == (7, math.ceil(n * bits / 8)) == (7, packed_row_bytes(n, bits))
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_pack_layout_is_lsb_first():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)
    packed = pack_bits(codes, 3)
    bits = sum(int(c) << (3 * j) for j, c in enumerate(codes[0]))
    assert packed[0].tolist() == list(bits.to_bytes(3, "little"))


def test_bits_per_weight_g128():
    assert get_format("pot", 3).bits_per_weight(128) == 3.125
    assert get_format("uniform", 3).bits_per_weight(128) == 3 + 24 / 128


def test_ragged_last_group_and_per_channel_tensor():
    torch.manual_seed(0)
    w = torch.randn(3, 10)
    fmt = get_format("uniform", 8)
    for g, groups in [(4, 3), (-1, 1), (0, 1), (64, 1)]:
        qw = quantize_weight(w, fmt, g)
        assert qw.scale.shape == (3, groups)
        assert qw.dequantize().shape == (3, 10)
        assert (qw.dequantize() - w).abs().max() < 0.03
    per_tensor = quantize_weight(w, fmt, 0)
    assert (per_tensor.scale == per_tensor.scale[0, 0]).all()


def test_high_bit_pot_scale_does_not_underflow_fp16():
    # 8-bit zero-excluded PoT spans a·2^-127 .. a: the thesis' s0 = max/2^127 is 0 in fp16, a is not.
    w = torch.randn(4, 64) * 1e-3
    qw = quantize_weight(w, get_format("pot", 8), 64)
    assert (qw.scale > 0).all()
    assert torch.isfinite(qw.dequantize()).all()
    assert (qw.dequantize() - w).abs().max() < 0.5 * w.abs().max()


def test_ste_gradient_vanishes_but_detached_codes_move_the_scale():
    # Thesis eq. 3.16 taken literally: W~ = s·2^(log2|w|/s) = |w| in the backward pass, so only
    # clamped weights carry a gradient to the scale; holding the codes constant gives P·2^E.
    fmt = get_format("pot", 4)
    w = torch.tensor([[[0.9, -0.35, 0.2, 0.05]]])
    grads = {}
    for grad in ("ste", "detach"):
        s = fmt.init_qparams(w).scale.clone().requires_grad_()
        fmt.fake_quant(w, QParams(s), grad).pow(2).sum().backward()
        grads[grad] = s.grad.item()
    assert grads["ste"] == pytest.approx(0.0, abs=1e-6)
    expected = 2 * sum(v * v / 0.9 for v in fmt.fake_quant(w, fmt.init_qparams(w)).flatten().tolist())
    assert grads["detach"] == pytest.approx(expected, rel=1e-5)


def test_init_qparams_clip_multiplies_scale():
    w = torch.randn(4, 32)
    fmt = get_format("pot", 3)
    base = init_qparams(w, fmt, 16).scale
    assert torch.allclose(init_qparams(w, fmt, 16, clip=0.5).scale, 0.5 * base)


def test_dequantize_matches_quantized_weight():
    w = torch.randn(5, 40)
    fmt = get_format("pot-zero", 4)
    qw = quantize_weight(w, fmt, 8)
    assert torch.equal(dequantize(qw.codes, qw.qparams(), fmt, 8), qw.dequantize())


@pytest.mark.parametrize("bad", [1, 9, 0, 3.5])
def test_bad_bits_give_one_line_error(bad):
    with pytest.raises(PotqError, match="bits must be an integer from 2 to 8") as e:
        PoTConfig(bits=bad)
    assert "\n" not in str(e.value)


def test_pot_seed_is_the_seed_definition():
    """y = sign·s·2^clip(round(log2(|x|/s + ε)), -E, E) with s = max|w|/2^E, exact zeros kept,
    and ε only moving weights far below s (the seed's "ε sets the resolution near zero")."""
    w = torch.tensor([[1.0, 0.5, 0.3, -0.26, 0.0, 1e-3, -1e-6, 0.7]])
    fmt = get_format("pot-seed", 5)  # the seed's 4-bit grid: exponents [-7, 7]
    assert fmt.half_range == 7
    qw = quantize_weight(w, fmt, -1)
    s = 1.0 / 2**7
    expected = [math.copysign(1.0, x) * s * 2 ** min(7, max(-7, round(math.log2(abs(x) / s + 1e-8)))) if x else 0.0
                for x in w[0].tolist()]
    assert qw.dequantize()[0].tolist() == pytest.approx(expected, rel=1e-6)
    coarse = fake_quantize(w, get_format("pot-seed", 5, epsilon=1.0), -1, qw.qparams())
    assert coarse[0, 5] == pytest.approx(s)  # |x|/s + 1 rounds to 2^0: ε swamps the small weight
    assert coarse[0, 4] == 0.0 and coarse[0, :4].tolist() == qw.dequantize()[0, :4].tolist()
    with pytest.raises(PotqError, match="format 'pot' has no option epsilon"):
        get_format("pot", 4, epsilon=0.1)


def test_bad_format_and_group_size():
    with pytest.raises(PotqError, match="unknown format 'log'"):
        QuantConfig("log", 3)
    with pytest.raises(PotqError, match="group size"):
        UniformConfig(bits=3, group_size=-5)
    assert PoTConfig(3, zero=True).format == "pot-zero"
    assert UniformConfig(4, symmetric=True).format == "uniform-sym"


@pytest.mark.parametrize("name", ["pot", "apot", "uniform", "uniform-sym"])
def test_the_stored_scale_is_fp16_and_its_gradient_float32(name):
    """Training sees the scale storage will hold, and a gradient past fp16's range stays finite
    (a group's summed gradient on Gemma-3's activations overflowed fp16 and turned the training NaN)."""
    fmt = get_format(name, 4)
    scale = torch.tensor([[0.0123, 3.3e-3]], requires_grad=True)
    stored = fmt.as_stored(QParams(scale, torch.zeros(1, 2))).scale
    assert torch.equal(stored, fmt.load_scale(fmt.store_scale(scale.detach())))
    (stored * 1e6).sum().backward()
    assert torch.equal(scale.grad, torch.full((1, 2), 1e6))
