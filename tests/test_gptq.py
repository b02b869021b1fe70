"""GPTQ for every format: lower output error than round-to-nearest on correlated inputs, and
end to end on stories260K."""

import copy

import pytest
import torch

import potq
from potq.eval.data import calibration_batch
from potq.formats import get_format
from potq.formats.weights import quantize_weight
from potq.methods.gptq import gptq_weight
from potq.nn import QuantLinear


def correlated_layer(seed: int = 0, rows: int = 48, cols: int = 96, tokens: int = 2048):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    x = torch.randn(tokens, cols, generator=g) @ mix * torch.linspace(0.2, 3.0, cols)  # correlated, uneven
    w = torch.randn(rows, cols, generator=g) * 0.05
    return w, x


@pytest.mark.parametrize("name", ["pot", "pot-zero", "uniform"])
@pytest.mark.parametrize("act_order, static_groups", [(False, False), (True, False), (False, True)])
def test_gptq_beats_round_to_nearest_on_output_error(name, act_order, static_groups):
    w, x = correlated_layer()
    hessian = 2 * x.T @ x / x.shape[0]
    fmt = get_format(name, 3)
    out_err = lambda q: float(((x @ (q - w).T) ** 2).mean())  # noqa: E731
    rtn = quantize_weight(w, fmt, 32).dequantize()
    gptq = gptq_weight(w, hessian, fmt, 32, block_size=40, act_order=act_order,
                       static_groups=static_groups)  # blocks straddle groups
    assert gptq.codes.shape == w.shape and gptq.scale.shape == (48, 3)
    # static groups (act-order implies them) keep round-to-nearest's scales; the plain order re-fits them
    assert torch.equal(gptq.scale, quantize_weight(w, fmt, 32).scale) == (act_order or static_groups)
    deq = gptq.dequantize()
    # every weight is on its group's grid
    assert torch.equal(quantize_weight(deq, fmt, 32, gptq.qparams()).codes, gptq.codes)
    assert out_err(deq) < out_err(rtn), (out_err(deq), out_err(rtn))


def test_gptq_on_stories_lowers_every_first_block_layer_error(stories_float):
    """Block 0 sees the float embeddings whatever is quantized, so its layers' calibration
    Hessians can be rebuilt here: GPTQ must beat round-to-nearest on each of them."""
    from potq.engine.blocks import capture_inputs, input_hessians
    from potq.models import transformer_blocks

    calib = calibration_batch(stories_float.tokenizer, 8, 64, seed=0)
    model = copy.deepcopy(stories_float.model)
    potq.quantize_(model, potq.PoTConfig(bits=3, group_size=32), method="gptq", calibration=calib, progress=False)
    assert all(isinstance(m, QuantLinear) for n, m in model.named_modules() if n.endswith("proj"))
    assert model.potq_meta["method_settings"]["damp"] == 0.01
    float_block = transformer_blocks(stories_float.model)[0]
    hessians = input_hessians(float_block, capture_inputs(stories_float.model, calib, 8))
    fmt = get_format("pot", 3)
    for name, h in hessians.items():
        w = float_block.get_submodule(name).weight.detach()
        out_err = lambda q: float((((q - w) @ h) * (q - w)).sum())  # noqa: E731  (= 2·E‖(q−w)x‖²)
        gptq = model.get_submodule(f"model.layers.0.{name}").dequantize()
        assert out_err(gptq) < out_err(quantize_weight(w, fmt, 32).dequantize()), name


def test_a_singular_hessian_is_one_clear_error():
    w = torch.randn(4, 8)
    with pytest.raises(potq.PotqError, match="not positive definite"):
        gptq_weight(w, -torch.eye(8), get_format("pot", 3), 8, damp=0.0)
