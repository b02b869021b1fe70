"""The quantization report (``potq quantize --report FILE``): what was done, how long it took,
and for block-wise methods the per-block, per-epoch loss (the thesis' Tables 4.6 and 4.7).

JSON for scripts (``.json``), Markdown for people (any other suffix); written atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from potq.paths import write_text_atomic


def build_report(model: nn.Module, source: str, seconds: float) -> dict[str, Any]:
    """Everything ``quantize_`` recorded on ``model``, plus the wall time of the whole run."""
    meta = getattr(model, "potq_meta", {})
    report = getattr(model, "potq_report", {})
    return {"model": source, **meta, "wall_seconds": seconds, "blocks": report.get("blocks"),
            "training": report.get("training")}


def to_markdown(report: dict[str, Any]) -> str:
    settings = ", ".join(f"{k}={v}" for k, v in sorted(report.get("method_settings", {}).items()))
    lines = [f"# potq quantize {report['model']}: {report['format']} {report['bits']}-bit "
             f"G{report['group_size']}, method {report['method']}", "",
             f"- wall time: {report['wall_seconds']:.1f} s",
             f"- settings: {settings or 'none'}",
             f"- calibration: {json.dumps(report.get('calibration'))}", ""]
    blocks = report.get("blocks")
    if blocks:
        epochs = len(blocks[0]["loss"]) - 1
        lines += ["Block output MSE on the calibration set: epoch 0 is the start (Step 1 or naive "
                  "scales), then after each epoch; *kept* is the lowest, the one saved.", "",
                  "| block | " + " | ".join(f"epoch {e}" for e in range(epochs + 1)) + " | kept | change | seconds |",
                  "|" + " --- |" * (epochs + 5)]
        for b in blocks:
            change = 100 * (b["kept"] / b["loss"][0] - 1) if b["loss"][0] else 0.0
            lines.append(f"| {b['block']} | " + " | ".join(f"{v:.4g}" for v in b["loss"])
                         + f" | {b['kept']:.4g} | {change:+.1f} % | {b['seconds']:.1f} |")
        total = sum(b["seconds"] for b in blocks)
        lines += ["", f"Block-wise time: {total:.1f} s over {len(blocks)} blocks "
                      f"({total / len(blocks):.1f} s per block)."]
    training = report.get("training")
    if training:
        lines += ["Loss estimates (training windows / held-out calibration windows):", "",
                  "| step | train | val |", "| ---: | ---: | ---: |"]
        lines += [f"| {h['step']} | {h['train']:.4f} | {h['val']:.4f} |" for h in training["history"]]
        lines += ["", f"Training: {training['tokens']:,} tokens in {training['seconds']:.1f} s."]
    return "\n".join(lines) + "\n"


def write_report(path: str | os.PathLike, report: dict[str, Any]) -> Path:
    text = json.dumps(report, indent=1) if Path(path).suffix == ".json" else to_markdown(report)
    return write_text_atomic(path, text)
