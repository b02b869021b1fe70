"""Run the fuzz suite at scale and write its counts to docs/results/fuzz.{json,md}.

    .venv/bin/python benchmarks/reliability.py            # 3 seeds x 2000 runs, about a minute
    .venv/bin/python benchmarks/readme_tables.py docs/reliability.md

Each seed runs in its own worker process under the fuzz suite's memory limit (tests/fuzzing.py);
a worker that crashes (SIGBUS, out of memory) is itself a failure and is counted as one.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
OUTCOMES = ("same", "changed", "error")


def run_seed(seed: int, cases: int) -> dict:
    with tempfile.TemporaryDirectory() as work:
        report = Path(work) / "fuzz.json"
        run = subprocess.run([sys.executable, "-m", "tests.fuzzing", "--cases", str(cases), "--seed", str(seed),
                              "--work", str(Path(work) / "w"), "--json", str(report)],
                             cwd=ROOT, capture_output=True, text=True)
        if run.returncode != 0:
            return {"cases": cases, "seed": seed, "counts": {},
                    "failures": [{"outcome": f"worker exited {run.returncode}", "stderr": run.stderr[-500:]}]}
        return json.loads(report.read_text())


def render(runs: list[dict], command: str) -> str:
    totals: dict[str, Counter] = {}
    for r in runs:
        for kind, counts in r["counts"].items():
            totals.setdefault(kind, Counter()).update(counts)
    failures = [f for r in runs for f in r["failures"]]
    lines = ["# Fuzz suite: the last large run", "",
             f"`{command}` (then `benchmarks/readme_tables.py docs/reliability.md`)", "",
             "| input | runs | loaded, same logits | loaded, other logits | one-line error | failures |",
             "| --- | --- | --- | --- | --- | --- |"]
    for kind, counts in totals.items():
        fails = sum(1 for f in failures if f.get("kind") == kind)
        lines.append(f"| {kind} | {sum(counts.values())} | {counts['same']} | {counts['changed']} | "
                     f"{counts['error']} | {fails} |")
    all_runs = sum(sum(c.values()) for c in totals.values())
    slowest = max((r.get("slowest_case_s", 0.0) for r in runs), default=0.0)
    lines += ["", "Other logits from a potq folder come only from a re-signed description (a consistent writer "
              "describing another model: group size, norms); from GGUF, llama2.c and Hugging Face inputs, from "
              "flipped weight or metadata bytes, which those formats carry no checksum for.",
              "", f"Failures (traceback, multi-line error, hang, crash, silent wrong result): {len(failures)} of "
              f"{all_runs} runs; slowest run {slowest:.2f} s.", ""]
    lines += [f"- {f}" for f in failures[:50]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--cases", type=int, default=2000, help="runs per seed")
    args = parser.parse_args()
    runs = []
    for i, seed in enumerate(args.seeds, 1):
        print(f"[{i}/{len(args.seeds)}] fuzz seed {seed}: {args.cases} runs", flush=True)
        runs.append(run_seed(seed, args.cases))
    command = f"benchmarks/reliability.py --seeds {' '.join(map(str, args.seeds))} --cases {args.cases}"
    (RESULTS / "fuzz.json").write_text(json.dumps(runs, indent=1) + "\n")
    (RESULTS / "fuzz.md").write_text(render(runs, command))
    print(f"-> {RESULTS / 'fuzz.md'}")


if __name__ == "__main__":
    main()
