"""The `potq` command line end to end: quantize -> info -> eval -> generate, and every bad input
ending as one line on stderr with exit code 2 and nothing written."""

import json
import shutil
import subprocess
import sys

import pytest

from potq.cli import main
from potq.paths import shared_file

STORIES_GGUF = str(shared_file("models/stories260K/stories260K.gguf"))


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse usage errors and --help
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("command", ["quantize", "eval", "generate", "chat", "serve", "info", "demo", "bench"])
def test_every_subcommand_has_help(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0 and "usage: potq" in out


def test_quantize_info_eval_generate(capsys, tmp_path):
    out = tmp_path / "pot3"
    code, text, _ = run(capsys, "quantize", "stories260k", "--format", "pot", "--bits", "3",
                        "--group-size", "32", "--method", "rtn", "-o", str(out))
    assert code == 0 and "bits per quantized weight" in text

    code, text, _ = run(capsys, "info", str(out), "--json", str(tmp_path / "info.json"))
    assert code == 0
    info = json.loads((tmp_path / "info.json").read_text())
    assert (info["format"], info["bits"], info["group_size"], info["method"]) == ("pot", 3, 32, "rtn")
    assert f"{info['bits_per_quantized_weight']:.3f} bits per quantized weight" in text
    assert "model.layers.4.mlp.down_proj" in text  # the per-layer table

    code, text, _ = run(capsys, "eval", str(out), "--dataset", "tinystories", "--ctx", "128",
                        "--max-windows", "3", "--json", str(tmp_path / "ppl.json"))
    assert code == 0 and "tinystories perplexity" in text
    result = json.loads((tmp_path / "ppl.json").read_text())
    assert result["windows"] == 3 and 1 < result["ppl"] < 1e6

    code, text, _ = run(capsys, "generate", str(out), "--prompt", "Once upon a time", "--max-new-tokens", "8")
    assert code == 0 and text.startswith("Once upon a time") and len(text.strip()) > len("Once upon a time")
    # the fused kernel (default) and the pure-PyTorch path give the same greedy text
    code, torch_text, _ = run(capsys, "generate", str(out), "--prompt", "Once upon a time", "--max-new-tokens", "8",
                              "--kernel", "torch", "--stats")
    assert code == 0 and torch_text.startswith(text) and "tok/s; PyTorch path: 35 packed layers" in torch_text


@pytest.mark.parametrize("argv, fragments", [
    (["quantize", "stories260k", "--bits", "9"], ["bits must be an integer from 2 to 8"]),
    (["quantize", "stories260k", "--bits", "1"], ["bits must be an integer from 2 to 8"]),
    (["quantize", "stories260k", "--format", "log"], ["invalid choice: 'log'"]),
    (["quantize", "stories260k", "--group-size", "-5"], ["group size"]),
    (["quantize", "no/such/model.gguf"], ["no such file or folder"]),
    (["quantize", "stories260k", "--method", "magic"], ["unknown method 'magic'"]),
    (["quantize", "stories260k", "--method", "rtn", "--epochs", "3"], ["method 'rtn' has no setting 'epochs'"]),
    (["quantize", "stories260k", "--objective", "act"], ["method 'rtn' has no setting 'objective'"]),
    (["quantize", "stories260k", "--method", "awq", "--act-order"], ["method 'awq' has no setting 'act_order'"]),
    (["quantize", "stories260k", "--method", "omniquant", "--batch-size", "0"], ["--batch-size must be at least 1"]),
])
def test_bad_quantize_input_writes_nothing(capsys, tmp_path, argv, fragments):
    out = tmp_path / "out"
    code, _, err = run(capsys, *argv, "-o", str(out))
    assert_one_line_error(code, err, *fragments)
    assert not out.exists()


@pytest.mark.parametrize("suffix", [".md", ".json"])
def test_twostep_report(capsys, tmp_path, suffix):
    report = tmp_path / f"report{suffix}"
    code, text, _ = run(capsys, "quantize", "stories260k", "--bits", "3", "--group-size", "32",
                        "--method", "twostep", "--epochs", "2", "--calib-samples", "4", "--calib-len", "32",
                        "--objective", "act", "-o", str(tmp_path / "m"), "--report", str(report))
    assert code == 0 and f"report -> {report}" in text
    manifest = json.loads((tmp_path / "m" / "potq.json").read_text())
    assert manifest["method_settings"]["objective"] == "act" and manifest["method_settings"]["epochs"] == 2
    if suffix == ".json":
        data = json.loads(report.read_text())
        assert data["method"] == "twostep" and data["wall_seconds"] > 0
        assert len(data["blocks"]) == 5 and all(len(b["loss"]) == 3 for b in data["blocks"])
    else:
        body = report.read_text()
        assert "| block | epoch 0 | epoch 1 | epoch 2 | kept | change | seconds |" in body
        assert body.count("\n| 4 |") == 1 and "wall time" in body


@pytest.mark.parametrize("method, flags", [("gptq", ["--no-act-order", "--static-groups", "--damp", "0.02"]),
                                           ("awq", ["--no-clip"]),
                                           ("omniquant", ["--epochs", "1"])])
def test_baseline_methods_from_the_command_line(capsys, tmp_path, method, flags):
    code, text, err = run(capsys, "quantize", "stories260k", "--format", "pot", "--bits", "3", "--group-size", "32",
                          "--method", method, *flags, "--calib-samples", "4", "--calib-len", "32", "-o", str(tmp_path / "m"))
    assert code == 0, err
    manifest = json.loads((tmp_path / "m" / "potq.json").read_text())
    assert manifest["method"] == method and manifest["calibration"]["samples"] == 4
    expected = {"gptq": {"act_order": False, "static_groups": True, "damp": 0.02}, "awq": {"clip": False}, "omniquant": {"epochs": 1}}[method]
    assert expected.items() <= manifest["method_settings"].items()


def test_corrupt_model_file(capsys, tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_text("this is not a gguf file")
    code, _, err = run(capsys, "quantize", str(fake), "-o", str(tmp_path / "out"))
    assert_one_line_error(code, err, "not a readable GGUF")
    truncated = tmp_path / "stories.gguf"
    truncated.write_bytes(open(STORIES_GGUF, "rb").read()[:50_000])
    code, _, err = run(capsys, "eval", str(truncated))
    assert_one_line_error(code, err, str(truncated))


def test_info_and_eval_of_a_non_potq_folder(capsys, tmp_path):
    code, _, err = run(capsys, "info", str(tmp_path))
    assert_one_line_error(code, err, "not a potq model folder")
    code, _, err = run(capsys, "eval", str(tmp_path))
    assert_one_line_error(code, err, "folder without config.json")


def test_empty_dataset(capsys, tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "tinystories_valid_head.txt").write_text("")
    monkeypatch.setenv("POTQ_SHARED", str(tmp_path))
    code, _, err = run(capsys, "eval", STORIES_GGUF, "--dataset", "tinystories", "--ctx", "64")
    assert_one_line_error(code, err, "tinystories")


def test_missing_shared_folder(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("POTQ_SHARED", str(tmp_path / "nowhere"))
    code, _, err = run(capsys, "eval", "stories260k")
    assert_one_line_error(code, err, "POTQ_SHARED")


def test_context_longer_than_text(capsys, tmp_path, monkeypatch):
    code, _, err = run(capsys, "eval", "stories260k", "--dataset", "tinystories", "--ctx", "4096")
    assert_one_line_error(code, err, "--ctx")


def test_installed_entry_point_prints_no_traceback(tmp_path):
    exe = shutil.which("potq") or f"{sys.executable} -m potq.cli"
    proc = subprocess.run([*exe.split(), "quantize", "stories260k", "--bits", "12", "-o", str(tmp_path / "x")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["potq: error: pot bits must be an integer from 2 to 8, got 12"]


def test_smollm2_3bit_g128_costs_about_3_125_bits(capsys, tmp_path):
    """The issue's acceptance check on the real default model (the slowest test, ~20 s)."""
    out = tmp_path / "smollm2-pot3"
    code, _, _ = run(capsys, "quantize", "smollm2-135m", "--format", "pot", "--bits", "3",
                     "--group-size", "128", "-o", str(out))
    assert code == 0
    code, _, _ = run(capsys, "info", str(out), "--json", str(tmp_path / "info.json"))
    info = json.loads((tmp_path / "info.json").read_text())
    # 3 bits + one fp16 scale per 128 weights; rows of 576 end in a 64-wide group (5 scales a row).
    assert info["bits_per_quantized_weight"] == pytest.approx(3.125, abs=0.02)
    expected_bytes = (info["quantized_weights"] * info["bits_per_quantized_weight"] / 8 + info["float_bytes"]
                      + info["embedding_bytes"])
    assert info["file_bytes"] == pytest.approx(expected_bytes, rel=0.01)
    # the GGUF's Q8_0 token table stays 8-bit (lossless), shared by the tied head: not inflated to float
    assert info["quantized_embedding_tables"] == 1 and info["bits_per_embedding_weight"] == pytest.approx(8.5)


def test_catalog_names_are_the_registries():
    """The parser offers names from potq.catalog (no torch at --help time); they must be the registries'."""
    from potq.catalog import DATASET_NAMES, FORMAT_NAMES, METHOD_NAMES
    from potq.eval.data import DATASETS
    from potq.formats import FORMATS
    from potq.methods import METHODS

    assert sorted(FORMAT_NAMES) == sorted(FORMATS) and sorted(METHOD_NAMES) == sorted(METHODS)
    assert tuple(DATASET_NAMES) == tuple(DATASETS)


def test_help_is_fast_and_every_option_has_help():
    import subprocess
    import sys
    import time

    from potq.cli import build_parser

    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "potq.cli", "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "exit codes" in run.stdout
    assert time.perf_counter() - start < 1.5  # the interpreter itself takes part of it
    assert "torch" not in subprocess.run([sys.executable, "-c", "import sys, potq.cli; potq.cli.build_parser(); "
                                          "print(' '.join(sys.modules))"], capture_output=True, text=True).stdout.split()
    parser = build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            assert action.help, f"potq {name} {action.option_strings or action.dest} has no help text"


def test_quiet_json_is_alone_on_stdout_for_a_block_wise_method(capsys, tmp_path):
    """Per-block notes go to stderr and --quiet silences them, so ``--json`` alone is parseable."""
    code = main(["quantize", "stories260k", "--method", "twostep", "--epochs", "1", "--calib-samples", "4",
                 "--calib-len", "64", "-o", str(tmp_path / "q"), "--quiet", "--json"])
    out, err = capsys.readouterr()
    assert code == 0 and json.loads(out)["method"] == "twostep" and "block 0" not in err


def test_int8_embeddings_pack_the_table_and_tied_head_in_8_bits(capsys, tmp_path, stories_float):
    """``--quantize-embeddings int8``: the token table (and the head tied to it) as symmetric 8-bit
    codes whatever the weights' format — a small error, read by the 8-bit GEMV — saved and reloaded."""
    import torch

    import potq
    from potq.kernels import fused
    from potq.nn import QuantEmbedding, QuantLinear
    from tests.zoo import tiny_folder

    folder = tiny_folder("gpt2", tmp_path / "gpt2", stories_float.tokenizer)
    code, _, err = run(capsys, "quantize", str(folder), "--quantize-embeddings", "int8", "-o", str(tmp_path / "q"))
    assert code == 0, err
    lm = potq.load(tmp_path / "q")
    table, head = lm.model.get_input_embeddings(), lm.model.get_output_embeddings()
    assert isinstance(table, QuantEmbedding) and (table.fmt.name, table.fmt.bits, table.group_size) == ("uniform-sym", 8, 32)
    assert isinstance(head, QuantLinear) and head.codes is table.codes and fused.serves_int8(head) == (fused.best_isa() != "none")
    source = potq.load_model(str(folder)).model.get_input_embeddings().weight
    error = (table.dequantize() - source).abs().max() / source.abs().max()
    assert 0 < error < 1 / 127  # within half a step of an 8-bit grid
    assert json.loads((tmp_path / "q" / "potq.json").read_text())["embeddings"]["bits"] == 8
    capsys.readouterr()
    code, _, err = run(capsys, "quantize", str(folder), "--quantize-embeddings", "int4", "-o", str(tmp_path / "r"))
    assert_one_line_error(code, err, "int4")
    with torch.inference_mode():
        assert torch.isfinite(lm.model(torch.tensor([[1, 5, 9]])).logits).all()


def test_threads_sleep_only_where_other_work_runs(monkeypatch):
    """The OpenMP wait policy: PASSIVE (sleeping threads) when the start-up sample finds other work,
    OpenMP's own short spin on an idle machine, the user's choice always; a peer benchmark gets the
    environment without the policy potq chose."""
    from potq import threads

    for busy, expected in ((1.0, "PASSIVE"), (0.0, None)):
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        monkeypatch.delenv(threads.SET_BY_POTQ, raising=False)
        monkeypatch.setattr(threads, "_sample", busy)
        threads.prefer_sleeping_threads()
        assert threads.os.environ.get("OMP_WAIT_POLICY") == expected
        assert "OMP_WAIT_POLICY" not in threads.user_environment()
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.delenv(threads.SET_BY_POTQ, raising=False)
    monkeypatch.setattr(threads, "_sample", 1.0)
    threads.prefer_sleeping_threads()
    assert threads.os.environ["OMP_WAIT_POLICY"] == "ACTIVE" == threads.user_environment()["OMP_WAIT_POLICY"]
