"""Copy generated result tables into README.md (or the Markdown files named on the command line,
e.g. docs/reliability.md), so no page holds a hand-typed number.

Every block ``<!-- table:NAME --> … <!-- /table:NAME -->`` in the page is replaced by the
Markdown table of ``docs/results/NAME.md`` (the lines starting with ``|``, the bf16 and the
earlier-quantization footnotes, the note on the machines that timed it and the list of rows not
measured yet), with a link to it.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from ppl_table import BF16_MARK, EARLIER_MARK, MACHINE_NOTE

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- table:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /table:(?P=name) -->)", re.S)


def table_of(name: str, page: Path) -> str:
    source = ROOT / "docs" / "results" / f"{name}.md"
    link = os.path.relpath(source, page.parent)
    lines = [line for line in source.read_text().splitlines() if line.startswith("|")]
    lines += [f"\n{line}" for line in source.read_text().splitlines()
              if line.startswith(("Not measured yet", f"{BF16_MARK} ", f"{EARLIER_MARK} ", MACHINE_NOTE, "Note: ", "\\* "))]
    return "\n".join(lines) + f"\n\n(from [docs/results/{name}.md]({link}), which holds the command that made it)\n"


def main(pages: list[str]) -> None:
    for page in [Path(p).resolve() for p in pages] or [ROOT / "README.md"]:
        text = BLOCK.sub(lambda m: m.group(1) + table_of(m.group("name"), page) + m.group(4), page.read_text())
        page.write_text(text)


if __name__ == "__main__":
    main(sys.argv[1:])
