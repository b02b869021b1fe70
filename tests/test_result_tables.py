"""The perplexity-table script the result pages come from, end to end on stories260K: a row is
quantized, saved, reloaded and evaluated, the store records where it was timed, and a view of the
store marks times that came from different machines."""

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import ppl_table  # noqa: E402  (a script of benchmarks/, not part of the package)

TABLE = ["ppl_table.py", "--model", "stories260k", "--dataset", "tinystories", "--ctx", "64", "--max-windows", "2"]


@pytest.fixture
def table(tmp_path, monkeypatch, capsys):
    """Run the script with the given arguments on a store in ``tmp_path``; returns the view's text."""
    def run(*extra: str) -> str:
        monkeypatch.setattr(sys, "argv", [*TABLE, "--store", str(tmp_path / "runs.json"),
                                          "--work", str(tmp_path / "work"), "--out", str(tmp_path / "view"), *extra])
        ppl_table.main()
        capsys.readouterr()
        return (tmp_path / "view.md").read_text()
    return run


def test_rows_are_stored_with_their_machine_and_marked_when_machines_differ(tmp_path, table):
    table("--rows", "float", "pot-zero:3", "uniform:3")
    runs = json.loads((tmp_path / "runs.json").read_text())
    quantized = runs["pot-zero:3"]
    assert quantized["machine"] and quantized["tinystories"]["machine"] == quantized["machine"]
    assert runs["float"]["tinystories"]["ppl"] < quantized["tinystories"]["ppl"]
    assert quantized["tinystories"]["windows"] == 2

    view = table("--no-measure", "--rows", "float", "pot-zero:3", "uniform:3")
    assert f"Quantization times measured on {quantized['machine']}" in view and " (A)" not in view

    runs["uniform:3"].pop("machine")  # as the rows stored before the machine was recorded
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    view = table("--no-measure", "--rows", "float", "pot-zero:3", "uniform:3")
    rows = {line.split(" | ")[0]: line for line in view.splitlines() if line.startswith("| ")}
    seconds = lambda label: rows[label].split(" | ")[-2]  # noqa: E731  (the quantize s cell; peak GiB is last)
    assert seconds("| pot-zero 3-bit rtn").endswith(" (A)") and seconds("| uniform 3-bit rtn").endswith(" (B)")
    assert rows["| pot-zero 3-bit rtn"].split(" | ")[-1] != "– |"  # its peak memory, measured now
    assert "(A) " + quantized["machine"] in view and "(B) Intel(R) Xeon(R)" in view


def test_a_cell_counts_only_for_the_weights_it_was_measured_on(tmp_path, table):
    table("--rows", "pot:3")
    store = tmp_path / "runs.json"
    first = json.loads(store.read_text())["pot:3"]
    assert first["tinystories"]["weights_sha256"] == first["weights_sha256"]
    table("--rows", "pot:3")  # the same saved weights: nothing is measured again
    assert json.loads(store.read_text())["pot:3"] == first

    runs = json.loads(store.read_text())
    runs["pot:3"]["tinystories"]["weights_sha256"] = "another quantization"
    store.write_text(json.dumps(runs))
    runs["pot:3"]["method"] = "gptq"  # rtn gives the same bits again, so its cells are never marked
    (tmp_path / "marked.json").write_text(json.dumps(runs))
    view = table("--no-measure", "--rows", "pot:3", "--store", str(tmp_path / "marked.json"))
    assert f"{first['tinystories']['ppl']:.2f}" in view and f"{ppl_table.EARLIER_MARK} |" in view
    assert f"{ppl_table.EARLIER_MARK} measured on an earlier quantization" in view
    table("--rows", "pot:3")
    again = json.loads(store.read_text())["pot:3"]
    assert again["tinystories"]["weights_sha256"] == first["weights_sha256"]
    kept = again["earlier"]  # the replaced cell is kept, with the quantization it was measured on
    assert [{k: v for k, v in e.items() if k != "quantization"} for e in kept] == [runs["pot:3"]["tinystories"]]
    assert kept[0]["quantization"]["machine"] == first["machine"]
    assert again["tinystories"]["ppl"] == pytest.approx(first["tinystories"]["ppl"])  # RTN: same bits
    table("--rows", "pot:3", "--force")  # quantized again into the folder it kept (its quantize.json included)
    assert json.loads(store.read_text())["pot:3"]["tinystories"]["ppl"] == pytest.approx(first["tinystories"]["ppl"])


def test_a_row_holding_a_cell_of_an_earlier_quantization_is_quantized_again(tmp_path, table):
    table("--rows", "pot:3")
    store = tmp_path / "runs.json"
    runs = json.loads(store.read_text())
    runs["pot:3"].update(method="gptq", quantize_seconds=-1.0)  # as a data-dependent row timed elsewhere
    runs["pot:3"]["tinystories"]["weights_sha256"] = "another quantization"
    store.write_text(json.dumps(runs))
    assert ppl_table.mixed(runs["pot:3"])
    shutil.rmtree(tmp_path / "work")  # its folder gone, as on a fresh machine
    table("--rows", "pot:3")  # all its data sets already hold a cell, yet it is measured again
    again = json.loads(store.read_text())["pot:3"]
    assert again["quantize_seconds"] > 0 and not ppl_table.mixed(again)
    assert again["tinystories"]["weights_sha256"] == again["weights_sha256"]
    assert again["earlier"][0]["weights_sha256"] == "another quantization"
