"""The staged methods (``awq,blockap,e2e``) on the real stories260K model: each stage lowers its
own objective, the packed result decodes exactly as trained, bad pipelines get one clear line."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import potq
from potq.engine.blocks import capture_inputs, outputs
from potq.errors import PotqError
from potq.eval.data import calibration_batch
from potq.methods import get_method, pipeline
from potq.methods.e2e import ScaledCodes
from potq.models import transformer_blocks
from potq.nn import QuantLinear
from potq.train.loop import cross_entropy


@pytest.fixture(scope="module")
def calib(stories_float):
    return calibration_batch(stories_float.tokenizer, 8, 64, seed=0)


def quantized(stories_float, calib, method, config=None, **settings):
    model = copy.deepcopy(stories_float.model)
    potq.quantize_(model, config or potq.PoTConfig(bits=3, group_size=32), method=method, calibration=calib,
                   progress=False, **settings)
    return model


def block0_error(float_model, model, calib) -> float:
    """Block 0's output MSE with its packed layers, against the float block, on ``calib``."""
    data = capture_inputs(float_model, calib, 4)
    got = outputs(transformer_blocks(model)[0], data)
    wanted = outputs(transformer_blocks(float_model)[0], data)
    return sum(F.mse_loss(g, w).item() for g, w in zip(got, wanted)) / len(got)


@pytest.mark.parametrize("config", [potq.PoTConfig(bits=3, group_size=32), potq.UniformConfig(bits=3, group_size=32),
                                    potq.QuantConfig("apot", 3, 32)], ids=["pot3", "uniform3", "apot3"])
def test_blockap_lowers_every_block_loss_below_step2s_and_packs_what_it_trained(stories_float, calib, config):
    """Weights and scales trained together reach a lower block loss than Step 2's scales alone from
    the same start; the packed block reproduces the loss the trainer kept."""
    model = quantized(stories_float, calib, "blockap", config, epochs=4)
    two = quantized(stories_float, calib, "twostep", config, epochs=4)
    mine, theirs = model.potq_report["blocks"], two.potq_report["blocks"]
    assert mine[0]["loss"][0] == pytest.approx(theirs[0]["loss"][0], rel=1e-2)  # one Step 1 start (fp16-rounded)
    for block in mine:  # later blocks start from different inputs: compare how far each method got
        assert block["kept"] < 0.95 * block["loss"][0]
    gain = lambda blocks: sum(b["kept"] / b["loss"][0] for b in blocks)  # noqa: E731
    assert gain(mine) < gain(theirs)
    assert all(isinstance(m, QuantLinear) for n, m in model.named_modules() if n.endswith("q_proj"))
    assert block0_error(stories_float.model, model, calib) == pytest.approx(model.potq_report["blocks"][0]["kept"],
                                                                             rel=1e-4)


def test_a_learning_rate_that_blows_up_stops_the_block_and_keeps_its_start(stories_float, calib, capsys):
    """Latent weights driven out of float range (an infinite rate here; a rate far too large for a
    model's weights in practice): each block stops there, keeps its start, says so — no NaN reaches
    the codes."""
    model = copy.deepcopy(stories_float.model)
    potq.quantize_(model, potq.QuantConfig("apot", 3, 32), method="blockap", calibration=calib, epochs=2,
                   weight_lr=float("inf"))
    blocks = model.potq_report["blocks"]
    assert all(b["diverged"] and b["kept"] == b["loss"][0] for b in blocks)
    assert block0_error(stories_float.model, model, calib) == pytest.approx(blocks[0]["kept"], rel=1e-4)
    assert torch.isfinite(model(calib[:1]).logits).all()
    assert "training diverged" in capsys.readouterr().err


def test_e2e_lowers_the_next_token_loss_and_decodes_exactly_as_trained(stories_float, calib):
    grid = quantized(stories_float, calib, "grid", objective="act")
    tuned = quantized(stories_float, calib, "e2e", e2e_steps=30, e2e_lr=1e-2)
    record = tuned.potq_report["e2e"]["training"]
    assert record["history"][0]["val"] > min(h["val"] for h in record["history"])
    held_out = calib[-1:]  # e2e keeps its best step by the loss on the last tenth of the windows
    loss = lambda m: cross_entropy(m, held_out[:, :-1], held_out[:, 1:]).item()  # noqa: E731
    assert loss(tuned) < loss(grid)
    for name, layer in tuned.named_modules():  # the codes never move: only the scales did
        if isinstance(layer, QuantLinear):
            assert torch.equal(layer.codes, grid.get_submodule(name).codes)


def test_scaled_codes_is_the_packed_weight_at_every_scale(stories_float):
    """Every format's value is linear in its group scale: the trainable view equals the decode."""
    w = stories_float.model.get_submodule("model.layers.0.mlp.up_proj").weight.detach()
    for config in (potq.PoTConfig(bits=3, group_size=32), potq.PoTConfig(bits=4, group_size=32, zero=True),
                   potq.UniformConfig(bits=3, group_size=32), potq.QuantConfig("apot", 4, 32)):
        from potq.formats.weights import quantize_weight

        layer = ScaledCodes(quantize_weight(w, config.make_format(), 32), None)
        with torch.no_grad():
            layer.gamma.uniform_(-0.1, 0.1)
        x = torch.randn(3, w.shape[1])
        packed = layer.quantized()
        assert torch.allclose(layer(x), x @ packed.dequantize().T, atol=1e-6)


def test_awq_then_blockap_records_its_stages_in_potq_json(stories, calib, tmp_path):
    potq.quantize_(stories, potq.PoTConfig(bits=3, group_size=32), method="blockap,awq", calibration=calib,
                   progress=False, epochs=1, weight_lr=1e-3)
    potq.save(stories, tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "potq.json").read_text())
    assert manifest["method"] == "blockap,awq"
    assert manifest["method_settings"]["stages"] == ["awq", "blockap"]  # run in kind order
    assert manifest["method_settings"]["weight_lr"] == 1e-3 and manifest["method_settings"]["epochs"] == 1
    assert "awq" in stories.model.potq_report["blocks"][0]
    assert potq.load(tmp_path / "m").model(calib[:1, :8]).logits.isfinite().all()


@pytest.mark.parametrize("spec, fragment", [("blockap,grid", "at most one quantizer"), ("awq,fancy", "unknown stage"),
                                            ("e2e,e2e", "named twice")])
def test_bad_pipelines_are_one_line_errors(spec, fragment):
    with pytest.raises(PotqError, match=fragment):
        get_method(spec)


def test_a_stage_setting_of_another_pipeline_is_refused(stories, calib):
    with pytest.raises(PotqError, match="no setting 'e2e_lr'"):
        potq.quantize_(stories, potq.PoTConfig(bits=3, group_size=32), method="awq,blockap", calibration=calib,
                       progress=False, e2e_lr=1.0)


def test_stage_names_are_the_registry():
    from potq.catalog import STAGE_NAMES

    assert tuple(STAGE_NAMES) == tuple(pipeline.STAGES)


def test_a_bit_budget_spends_its_bits_where_the_error_is_and_stays_within_it(stories, calib, tmp_path):
    """``bpw`` 2.6 at G32 (PoT 2-bit costs 2.5): some layers get wider grids, the whole model's bits
    per weight stay within the budget, and the saved file says so layer by layer."""
    from potq.info import summary
    from potq.methods.allocate import allocate
    from potq.quantize import quantizable_layers

    layers = quantizable_layers(stories.model)
    config = potq.PoTConfig(bits=2, group_size=32)
    plan = allocate(stories.model, layers, config, calib, 2.6, progress=False)
    assert 2.5 < plan.bpw <= 2.6
    widths = {c.bits for c in plan.configs.values()}
    assert 2 in widths and len(widths) > 1
    for name, c in plan.configs.items():  # a layer kept narrow would lose more at its next width per bit
        errors = plan.errors[name]
        assert errors[f"{c.format}{c.bits}"] <= errors["pot2"]
    wider = max(plan.configs, key=lambda n: plan.configs[n].bits)
    assert plan.errors[wider]["pot2"] > min(e["pot2"] for e in plan.errors.values())
    potq.quantize_(stories, config, method="grid", calibration=calib, progress=False, bpw=2.6)
    potq.save(stories, tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "potq.json").read_text())
    assert manifest["bpw"] == 2.6 and manifest["allocation"] == plan.labels()
    assert {e["bits"] for e in manifest["quantized_layers"].values()} == widths
    assert summary(tmp_path / "m")["bits_per_quantized_weight"] <= 2.6
    back = potq.load(tmp_path / "m")
    with torch.no_grad():
        assert torch.allclose(back.model(calib[:1]).logits, stories.model(calib[:1]).logits, atol=1e-4)


def test_a_bit_budget_below_the_narrowest_grid_or_without_a_staged_method_is_refused(stories, calib):
    with pytest.raises(PotqError, match=r"below 2\.5\d\d, the narrowest pot 2-bit"):
        potq.quantize_(stories, potq.PoTConfig(bits=2, group_size=32), method="grid", calibration=calib,
                       progress=False, bpw=2.2)
    with pytest.raises(PotqError, match="staged method"):
        potq.quantize_(stories, potq.PoTConfig(bits=2, group_size=32), method="rtn", bpw=3.0)


def cli(capsys, *argv: str) -> tuple[int, str]:
    from potq.cli import main

    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def test_a_staged_method_and_a_budget_from_the_command_line(capsys, tmp_path):
    code, err = cli(capsys, "quantize", "stories260k", "--format", "pot", "--bits", "2", "--group-size", "32",
                    "--method", "awq,blockap,e2e", "--epochs", "1", "--e2e-steps", "2", "--bpw", "2.7",
                    "--calib-samples", "4", "--calib-len", "32", "-q", "-o", str(tmp_path / "m"))
    assert code == 0, err
    manifest = json.loads((tmp_path / "m" / "potq.json").read_text())
    assert manifest["method"] == "awq,blockap,e2e" and manifest["bpw"] == 2.7
    assert manifest["method_settings"]["e2e_steps"] == 2 and manifest["method_settings"]["epochs"] == 1
    code, err = cli(capsys, "info", str(tmp_path / "m"), "--json")
    assert code == 0, err


@pytest.mark.parametrize("argv, fragment", [(["--method", "awq,fancy"], "unknown method 'awq,fancy'"),
                                            (["--method", "rtn", "--bpw", "3"], "staged method"),
                                            (["--method", "blockap,grid"], "at most one quantizer")])
def test_bad_staged_methods_from_the_command_line_are_one_line(capsys, tmp_path, argv, fragment):
    code, err = cli(capsys, "quantize", "stories260k", *argv, "--calib-samples", "4", "--calib-len", "32",
                    "-o", str(tmp_path / "x"))
    assert code == 2 and fragment in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()
