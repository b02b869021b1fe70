"""What the result scripts share: a JSON store of measurements, written atomically, and the
command line that made it (recorded next to every table so anyone can re-run it)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from potq.paths import write_text_atomic


def load(path: Path) -> dict:
    """The store at ``path``, or an empty one (``{"runs": {}}``)."""
    return json.loads(path.read_text()) if path.exists() else {"runs": {}}


def save(path: Path, store: dict) -> None:
    """Write the store (temporary file + rename), recording this script's command line."""
    store["command"] = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    write_text_atomic(path, json.dumps(store, indent=1))


def stored(folder: Path, prefix: str):
    """``(model name, store)`` of every ``PREFIX-MODEL.json`` in ``folder``, by name."""
    for path in sorted(folder.glob(f"{prefix}-*.json")):
        yield path.stem.removeprefix(f"{prefix}-"), json.loads(path.read_text())


def eval_arguments(p: argparse.ArgumentParser) -> None:
    """The options every result script takes: the model, where it is scored, its samples."""
    p.add_argument("--model", default="nanogpt-shakespeare")
    p.add_argument("--dataset", default=None, help="default: shakespeare for char models, else wikitext2")
    p.add_argument("--ctx", type=int, default=None)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--sample-tokens", type=int, default=48)
    p.add_argument("--markdown-only", action="store_true", help="rebuild the Markdown from the stores")


def measure_or_rebuild(p: argparse.ArgumentParser, run: Callable[[argparse.Namespace], None],
                       write_markdown: Callable[[], None]) -> None:
    """Parse the command line; measure (then write), or only rebuild the Markdown."""
    args = p.parse_args()
    if args.markdown_only:
        write_markdown()
    else:
        run(args)
