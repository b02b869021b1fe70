"""The fuzz suite (tests/fuzzing.py): seeded mutants of potq folders, GGUF, llama2.c and Hugging
Face inputs each end in the right answer or one clean line, within a time and memory bound."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_fuzzed_inputs_end_in_the_right_answer_or_one_line(tmp_path):
    report = tmp_path / "fuzz.json"
    run = subprocess.run([sys.executable, "-m", "tests.fuzzing", "--cases", "1500", "--seed", "0",
                          "--work", str(tmp_path / "work"), "--json", str(report)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]  # a crash of the worker (SIGBUS, memory) fails here
    result = json.loads(report.read_text())
    assert result["failures"] == []
    assert result["slowest_case_s"] < result["case_limit_s"]
    for kind, counts in result["counts"].items():  # every kind was both refused and (some mutants) accepted
        assert counts.get("error", 0) > 0 and counts.get("same", 0) + counts.get("changed", 0) > 0, (kind, counts)
        assert set(counts) <= {"same", "changed", "error"}, (kind, counts)
