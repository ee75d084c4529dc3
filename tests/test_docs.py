"""The docs stay true: the generated recipe reference is current, every `prefopt ...` command shown parses, every
relative link points to a file, and the README stays a front door."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from prefopt.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
COMMAND = re.compile(r"^(?:\$\s+)?(?:\.venv/bin/)?prefopt(?:\s|$)")
OPTION = re.compile(r"(?<![\w-])(--[a-zA-Z][\w-]*)")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _generator():
    spec = importlib.util.spec_from_file_location("recipe_reference", ROOT / "scripts" / "recipe_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipe_reference_is_current():
    gen = _generator()
    assert gen.OUT.read_text(encoding="utf-8") == gen.render(), (
        "docs/recipe-reference.md is out of date: run python scripts/recipe_reference.py")
    assert gen.main(["--check"]) == 0


def _commands(path: Path) -> list[str]:
    """`prefopt ...` command lines in the file's fenced code blocks (continuations joined, comments dropped,
    `a && b; c | d` split)."""
    found = []
    for block in FENCE.findall(path.read_text(encoding="utf-8")):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s#.*$", "", line).strip()
            for part in re.split(r"\s*(?:&&|\|\||;|\s\|\s)\s*", line):
                if COMMAND.match(part.strip()):
                    found.append(part.strip())
    return found


def _cases() -> list[tuple[str, str]]:
    return [(str(p.relative_to(ROOT)), c) for p in DOCS for c in _commands(p)]


def test_docs_show_commands():
    shown = {c.split()[1] for _, c in _cases() if len(c.split()) > 1}
    assert {"run", "plan", "status"} <= {s for s in shown if not s.startswith("-")}


@pytest.mark.parametrize("where, command", _cases())
def test_command_parses(where, command):
    words = re.sub(r"^(\$\s+)?(\.venv/bin/)?prefopt", "", command).split()
    sub = next((w for w in words if not w.startswith("-")), None)
    runner = CliRunner()
    if sub is None or (words and words[0].startswith("-")):  # prefopt --version / --help
        result = runner.invoke(main, ["--help"])
        assert result.exit_code == 0, result.output
        for opt in OPTION.findall(command):
            assert opt in ("--help", "--version") or opt in result.output, f"{where}: {command}: no {opt}"
        return
    assert sub in main.commands, f"{where}: {command}: no subcommand {sub!r}"
    result = runner.invoke(main, [sub, "--help"])
    assert result.exit_code == 0, result.output
    for opt in OPTION.findall(command):
        assert opt in result.output, f"{where}: {command}: `prefopt {sub}` has no option {opt}"


def _anchors(path: Path) -> set[str]:
    """The heading anchors GitHub makes for a Markdown file: lower case, punctuation but - and _ dropped, spaces -."""
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    out = set()
    for heading in re.findall(r"^#+\s+(.+?)\s*$", text, re.M):
        out.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    return out


def test_relative_links_point_to_files():
    broken = []
    for path in DOCS:
        text = FENCE.sub("", path.read_text(encoding="utf-8"))
        for target in LINK.findall(text):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            file, _, anchor = target.partition("#")
            dest = path.parent / file if file else path
            if not dest.exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{path.relative_to(ROOT)}: {target} (no heading makes #{anchor})")
    assert not broken, "links to files or headings that do not exist:\n" + "\n".join(broken)


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) < 200, f"README.md has {len(lines)} lines: move detail into docs/"
    assert "## Set up a fresh machine (two commands)" in lines
