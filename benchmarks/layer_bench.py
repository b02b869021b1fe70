"""What the small per-layer / per-block benchmarks share: their calibration options and how
they write a result (the raw JSON beside its Markdown view, both holding the command)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from potq.paths import write_text_atomic


def add_calibration_args(p: argparse.ArgumentParser) -> None:
    """``--calib-samples``/``--calib-len`` (potq's 32×512 default) and the required ``--out``."""
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--out", required=True, help="output path without suffix: writes .json and .md")


def write_result(out: str, payload: dict, markdown: str) -> None:
    """Write ``out.json`` and ``out.md`` and print the Markdown."""
    write_text_atomic(Path(out).with_suffix(".json"), json.dumps(payload, indent=1))
    write_text_atomic(Path(out).with_suffix(".md"), markdown)
    print(markdown)
