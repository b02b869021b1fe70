"""The README's commands still exist with the options they use, and its Python example runs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from potq.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def shell_commands() -> list[list[str]]:
    commands = []
    for block in code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                commands.append(shlex.split(line))
    return commands


def test_readme_has_the_two_commands_and_they_are_make_targets():
    commands = shell_commands()
    assert ["make", "demo"] in commands and ["make", "test"] in commands
    targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M)
    for command in commands:
        if command[0] == "make":
            assert command[1] in targets, command


def test_every_potq_command_in_the_readme_parses():
    parser = build_parser()
    potq_commands = [c for c in shell_commands() if Path(c[0]).name == "potq"]
    assert {c[1] for c in potq_commands} >= {"quantize", "info", "eval", "generate"}
    for command in potq_commands:
        try:
            parser.parse_args(command[1:])
        except SystemExit:
            pytest.fail(f"the README's `{' '.join(command)}` no longer parses")


def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    (example,) = code_blocks("python")
    monkeypatch.chdir(tmp_path)  # its out/ folder goes here
    exec(compile(example.replace('"smollm2-135m"', '"stories260k"'), "README.md", "exec"), {})
    assert (tmp_path / "out" / "smollm2-pot4" / "potq.json").is_file()


def test_readme_is_a_front_door():
    assert len(README.splitlines()) <= 150
    for link in re.findall(r"\]\(([^)#]+)\)", README):
        assert (ROOT / link).exists(), link


def test_links_in_the_docs_resolve():
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for link in re.findall(r"\]\(([^)#\s]+)\)", page.read_text()):
            if not link.startswith("http"):
                assert (page.parent / link).exists(), f"{page.relative_to(ROOT)}: {link}"
