"""Decoding speed of the trained rows themselves: the packed folders of the budget tables (PoT and
APoT, `blockap,e2e`), each in its own process, in turn, in one run — so that a PoT row and its APoT
twin are compared on the same machine minute, and the "greedy tokens = PyTorch path" check runs on
models whose perplexity means something (``potq bench`` times round-to-nearest folders).

    python benchmarks/trained_speed.py --work out/bench/smollm2-135m --rows pot-4-blockap+e2e-64 \
        apot-4-blockap+e2e-64 pot-2-blockap+e2e-64 apot-2-blockap+e2e-64 --peer smollm2-135m \
        --out docs/results/trained-speed
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from potq.bench import bandwidth, decode, peer
from potq.bench.timing import machine
from potq.paths import write_text_atomic


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="the folder holding the packed rows (ppl_table.py's --work/MODEL)")
    p.add_argument("--rows", nargs="+", required=True, help="folder names under --work")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--peer", default=None, metavar="MODEL",
                   help="also time llama.cpp's Q4_0 of this model (a short name or .gguf) in the same rounds")
    p.add_argument("--out", required=True, help="output path without extension (.md and .json are written)")
    p.add_argument("--render", action="store_true", help="measure nothing: write the .md again from the .json")
    args = p.parse_args()
    if args.render:
        report = json.loads(Path(args.out).with_suffix(".json").read_text())
        write_text_atomic(Path(args.out).with_suffix(".md"), "\n".join(render(report)))
        return
    folders = {row: str(Path(args.work) / row) for row in args.rows}
    missing = [f for f in folders.values() if not (Path(f) / "potq.json").is_file()]
    if missing:
        sys.exit(f"trained_speed.py: no packed folder at {missing[0]} (make it with benchmarks/ppl_table.py)")
    peers = {}
    if args.peer and peer.available():
        from potq.models.registry import resolve

        peers = {"llama.cpp Q4_0": peer.files(resolve(args.peer)[1])["Q4_0"]}
    timed = decode.run("", threads=args.threads, variants=list(folders), folders=folders, rounds=args.rounds,
                       peers=peers)
    report = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "machine": machine(),
              "read_gb_s": bandwidth.read_gb_s(), "decode": {n: r for n, r in timed.items() if n not in peers},
              "peer": {name: timed[name] for name in peers}}
    write_text_atomic(Path(args.out).with_suffix(".json"), json.dumps(report, indent=1))
    lines = render(report)
    write_text_atomic(Path(args.out).with_suffix(".md"), "\n".join(lines))
    print("\n".join(lines))


def render(report: dict) -> list[str]:
    """The page of a measured report."""
    results = report["decode"]
    lines = ["# Decoding speed of the trained PoT and APoT rows", "", "```", report["command"], "```", "",
             f"{report['machine']}.", "", *decode.markdown(results, 64, 128, report["read_gb_s"]), "",
             "Greedy tokens = PyTorch path: whether the native decoder's 128 greedy tokens (8-bit "
             "activations, float16 KV cache) are the PyTorch path's (float activations); close logits of "
             "two paths can part after some tokens, and once one token differs the rest follow their own "
             "text. The native path's perplexity against the PyTorch path's: [native-ppl](native-ppl.md).", ""]
    if report["peer"]:
        q4 = report["peer"]["llama.cpp Q4_0"]
        lines += [f"llama.cpp Q4_0 in the same rounds: {q4['tokens_per_s']:.1f} tok/s decoding, "
                  f"{q4['prefill_tokens_per_s']:.0f} tok/s prefill.", "",
                  "| model | decoding / llama.cpp Q4_0 | prefill / llama.cpp Q4_0 |", "|---|---:|---:|"]
        lines += [f"| {name} | {r['tokens_per_s'] / q4['tokens_per_s']:.2f}× | "
                  f"{r['prefill_tokens_per_s'] / q4['prefill_tokens_per_s']:.2f}× |" for name, r in results.items()]
        lines.append("")
    return lines


if __name__ == "__main__":
    main()
