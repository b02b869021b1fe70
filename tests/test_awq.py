"""AWQ for every format: the scale search picks the grid minimum, folding keeps the float block
exactly, and the whole method runs on stories260K."""

import copy

import pytest
import torch

import potq
from potq.engine.blocks import capture_inputs, input_statistic, outputs
from potq.eval.data import calibration_batch
from potq.formats import get_format
from potq.methods.awq import ALPHAS, search_clip, search_scale
from potq.models.arch import fold_groups
from potq.models import transformer_blocks
from potq.nn import QuantLinear


@pytest.fixture(scope="module")
def calib(stories_float):
    return calibration_batch(stories_float.tokenizer, 4, 64, seed=0)


def block0(model, calib):
    data = capture_inputs(model, calib, 4)
    block = transformer_blocks(model)[0]
    return block, data, outputs(block, data)


@pytest.mark.parametrize("name", ["pot", "uniform"])
def test_chosen_alpha_is_the_grid_minimum_and_folding_is_exact(stories_float, calib, name):
    model = copy.deepcopy(stories_float.model)
    block, data, targets = block0(model, calib)
    mean_abs = input_statistic(block, data, lambda x: x.abs().sum(0))
    fold = fold_groups(block, data.inputs[0], data.kwargs)[0]
    names = fold.names
    s, alpha, errors = search_scale(block, data, targets, mean_abs[names[0]], {n: get_format(name, 3) for n in names}, 32)
    assert len(errors) == len(ALPHAS) and alpha == float(ALPHAS[int(torch.tensor(errors).argmin())])
    assert min(errors) <= errors[0]  # α = 0 (no scaling, plain round-to-nearest) is on the grid
    fold.apply(block, s)
    for folded, target in zip(outputs(block, data), targets):
        torch.testing.assert_close(folded, target, rtol=1e-4, atol=1e-5)


def test_clip_search_never_loses_to_no_clipping():
    torch.manual_seed(0)
    w, x = torch.randn(8, 64), torch.randn(256, 64)
    fmt = get_format("pot", 3)
    ratio = search_clip(w, x, fmt, 32)
    assert ratio.shape == (8, 2) and bool((ratio <= 1).all())
    from potq.formats.weights import fake_quantize, init_qparams

    def group_output_error(r):
        diff = fake_quantize(w, fmt, 32, init_qparams(w, fmt, 32, clip=r)) - w
        return torch.stack([((x[:, g * 32:(g + 1) * 32] @ diff[:, g * 32:(g + 1) * 32].T) ** 2).mean(0)
                            for g in range(2)], dim=1)  # [rows, groups]

    assert bool((group_output_error(ratio) <= group_output_error(1.0) * (1 + 1e-5)).all())


@pytest.mark.parametrize("name", ["pot", "uniform"])
def test_awq_quantizes_stories(stories_float, calib, name):
    model = copy.deepcopy(stories_float.model)
    potq.quantize_(model, potq.QuantConfig(name, 3, 32), method="awq", calibration=calib, progress=False)
    assert all(isinstance(m, QuantLinear) for n, m in model.named_modules() if n.endswith("proj"))
    blocks = model.potq_report["blocks"]
    assert len(blocks) == 5 and set(blocks[0]["groups"]) == {"q_proj+k_proj+v_proj", "gate_proj+up_proj", "down_proj"}
    ids = calib[:2]
    with torch.no_grad():
        assert torch.isfinite(model(ids, labels=ids).loss)
