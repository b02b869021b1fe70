"""Step 1 (grid search of group scales) against a brute-force loop, and on the real model."""

import pytest
import torch

import potq
from potq.formats import get_format
from potq.formats.grouping import to_groups
from potq.formats.weights import fake_quantize, init_qparams
from potq.methods.grid import MULTIPLIERS, search_scales
from potq.nn import QuantLinear


@pytest.mark.parametrize("name", ["pot", "pot-zero", "uniform"])
def test_chosen_b_minimises_each_group_error_brute_force(name):
    torch.manual_seed(0)
    w = torch.randn(3, 40) * torch.tensor([[0.1], [1.0], [3.0]])
    fmt = get_format(name, 3)
    qp, best = search_scales(w, fmt, 16)  # 40 = 16 + 16 + 8: a ragged last group
    assert best.shape == (3, 3)
    for r in range(3):
        for g, cols in enumerate([slice(0, 16), slice(16, 32), slice(32, 40)]):
            group = w[r:r + 1, cols]
            errs = []
            for b in MULTIPLIERS.tolist():
                q = fake_quantize(group, fmt, -1, init_qparams(group, fmt, -1, clip=b))
                errs.append(float(((q - group) ** 2).sum()))
            brute = MULTIPLIERS[int(torch.tensor(errs).argmin())]
            assert best[r, g] == brute, (r, g)
    # the searched scale is never worse than round-to-nearest (b = 1 is on the grid)
    rtn = init_qparams(w, fmt, 16)
    err = lambda p: float(((fake_quantize(w, fmt, 16, p) - w) ** 2).sum())  # noqa: E731
    assert err(qp) <= err(rtn)


def test_grid_method_lowers_weight_error_on_stories(stories):
    layers = {n: m.weight.detach().clone() for n, m in stories.model.named_modules()
              if isinstance(m, torch.nn.Linear) and "layers" in n}
    potq.quantize_(stories.model, potq.PoTConfig(bits=3, group_size=32), method="grid", progress=False)
    fmt = get_format("pot", 3)
    for name, w in layers.items():
        layer = stories.model.get_submodule(name)
        assert isinstance(layer, QuantLinear)
        grid_err = (layer.dequantize() - w).pow(2).sum()
        rtn_err = (fake_quantize(w, fmt, 32, fmt.as_stored(init_qparams(w, fmt, 32))) - w).pow(2).sum()
        assert grid_err <= rtn_err * 1.001, name  # fp16 rounding of the scale may cost a hair
    assert stories.model.potq_meta["method"] == "grid"


def test_padding_never_counts():
    # A ragged group padded with zeros: zero-excluded PoT would map pads to ±a·2^-K; they must
    # not influence the choice, so a group equals its unpadded twin.
    torch.manual_seed(1)
    w = torch.randn(2, 20)
    fmt = get_format("pot", 2)
    _, best_ragged = search_scales(w, fmt, 16)
    _, best_alone = search_scales(w[:, 16:], fmt, -1)
    assert torch.equal(best_ragged[:, 1], best_alone[:, 0])
    assert to_groups(w, 16).shape == (2, 2, 16)


@pytest.mark.parametrize("name", ["pot", "pot-zero", "apot"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_exact_shortcut_equals_trying_every_multiplier(stories_float, name, bits):
    # The histogram shortcut must give the same errors as quantizing with all 200 multipliers,
    # on real weights, with per-column weights and a ragged last group (64 = 24 + 24 + 16).
    from potq.methods.grid import stepped_errors, tried_errors

    w = stories_float.model.get_submodule("model.layers.0.self_attn.q_proj").weight.detach()
    torch.manual_seed(bits)
    column_weight = torch.rand(w.shape[1]) + 0.1
    wg = to_groups(w.float(), 24)
    weight = to_groups(column_weight[None], 24)
    fmt = get_format(name, bits)
    fast = stepped_errors(wg, fmt.magnitude_steps(), MULTIPLIERS, weight)
    slow = tried_errors(wg, fmt, MULTIPLIERS, weight)
    assert fast.shape == slow.shape == (200, w.shape[0], 3)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-9)
    chosen = slow.gather(0, fast.argmin(0)[None])[0]
    torch.testing.assert_close(chosen, slow.min(0).values, rtol=1e-5, atol=0)


def test_uneven_multiplier_grid_uses_binary_search():
    from potq.methods.grid import group_errors, tried_errors

    torch.manual_seed(2)
    w = torch.randn(4, 64)
    fmt = get_format("pot", 3)
    uneven = torch.tensor([0.3, 0.5, 0.8, 0.9, 1.0, 1.3])
    fast = group_errors(w, fmt, 32, uneven)
    slow = tried_errors(to_groups(w, 32), fmt, uneven, torch.ones(1, 2, 32))
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-9)
    with pytest.raises(ValueError, match="increasing"):
        group_errors(w, fmt, 32, uneven.flip(0))


@pytest.mark.parametrize("name", ["pot", "uniform"])
def test_the_row_chunked_search_is_the_whole_search(name, monkeypatch):
    import potq.methods.grid as grid
    from potq.formats import get_format

    torch.manual_seed(0)
    w, fmt = torch.randn(300, 96), get_format(name, 3)
    whole_qp, whole_b = grid.search_scales(w, fmt, 32)
    monkeypatch.setattr(grid, "ROW_CHUNK", 64)
    chunked_qp, chunked_b = grid.search_scales(w, fmt, 32)
    assert torch.equal(chunked_qp.scale, whole_qp.scale) and torch.equal(chunked_b, whole_b)
    assert (whole_qp.zero is None) == (chunked_qp.zero is None)
    if whole_qp.zero is not None:
        assert torch.equal(chunked_qp.zero, whole_qp.zero)
