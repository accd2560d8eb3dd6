"""The README and docs/ tell the truth about the command line and link only to real places:
every `memupdate …` and `memupdate-client …` line in a code block parses with the real argument
parsers, and every relative link (and its #anchor) resolves."""

import re
import shlex
from pathlib import Path

import pytest

from clients.cli import build_parser as client_parser
from memupdate.cli import build_parser as memupdate_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PARSERS = {"memupdate": memupdate_parser, "memupdate-client": client_parser}


def code_lines(text: str):
    """(line number, command) for each command line inside fenced code blocks, with `\\`
    continuations joined and a leading `$ ` prompt dropped."""
    in_code, pending, start = False, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip().startswith("```"):
            in_code, pending = not in_code, ""
            continue
        if not in_code:
            continue
        pending, start = (
            (pending + " " + line.strip(), start) if pending else (line.strip(), number)
        )
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        yield start, pending.removeprefix("$ ")
        pending = ""


def commands():
    found = []
    for page in PAGES:
        for number, line in code_lines(page.read_text()):
            if line.split(" ", 1)[0] not in PARSERS:
                continue
            words = shlex.split(line, comments=True)
            if words:
                found.append(pytest.param(words, id=f"{page.name}:{number}"))
    return found


def test_the_docs_show_commands():
    # Guards the parametrized test below against silently checking nothing.
    assert len(commands()) >= 20


@pytest.mark.parametrize("words", commands())
def test_command_parses(words, capsys):
    try:
        PARSERS[words[0]]().parse_args(words[1:])
    except SystemExit as stop:
        pytest.fail(f"`{' '.join(words)}` does not parse: {capsys.readouterr().err.strip()}")
        raise stop


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    in_code, found = False, set()
    for line in page.read_text().splitlines():
        if line.strip().startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            found.add(slug(line.lstrip("#")))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        where = (page.parent / path).resolve() if path else page
        if not where.exists():
            broken.append(f"{target}: no such file")
        elif anchor and where.suffix == ".md" and anchor not in anchors(where):
            broken.append(f"{target}: no heading #{anchor} in {where.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)
