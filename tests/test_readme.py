"""The README is the front door: under 300 lines, with what jaxkd is, the two commands, the headline
results (each printed beside the command that regenerates it, and the same as in the docs), the method
table (the registry's) and links that resolve. The rest lives in docs/ (tests/test_docs.py)."""

import pathlib
import re

from jaxkd import methods

ROOT = pathlib.Path(__file__).parent.parent
README = ROOT / "README.md"
TABLE_START, TABLE_END = "<!-- method-table: start -->", "<!-- method-table: end -->"


def text() -> str:
    return README.read_text()


def section(start: str, end: str) -> str:
    s = text()
    return s[s.index(start):s.index(end)]


def tables(markdown: str) -> list[tuple[int, str]]:
    """(first line number, text) of every Markdown table."""
    found, lines, i = [], markdown.splitlines(), 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            found.append((i, "\n".join(lines[i:j])))
            i = j
        else:
            i += 1
    return found


def test_readme_is_under_300_lines():
    assert len(text().splitlines()) < 300


def test_readme_has_the_two_commands():
    two = section("## Two commands", "## Headline results")
    assert "pip install -e . && python -m experiments.distill\n" in two
    assert 'pip install -e ".[dev]" && pytest\n' in two


def test_readme_method_table_is_the_registry():
    # tests/test_registry.py checks the same; docs/methods.md shows the table by including these lines.
    s = text()
    between = s[s.index(TABLE_START) + len(TABLE_START):s.index(TABLE_END)]
    assert between.strip() == methods.method_table(), "regenerate: python -c 'import jaxkd; print(jaxkd.methods.method_table())'"
    assert TABLE_START in (ROOT / "docs" / "methods.md").read_text()


def test_each_headline_table_is_printed_beside_its_command_and_is_the_docs_table():
    headline = section("## Headline results", "## Methods")
    docs = (ROOT / "docs" / "results.md").read_text() + (ROOT / "docs" / "benchmarks.md").read_text()
    found = tables(headline)
    assert len(found) >= 4
    lines = headline.splitlines()
    for start, table in found:
        before = "\n".join(lines[max(0, start - 8):start])
        assert re.search(r"`python (-m experiments\.|benchmarks/)[^`]*`", before), f"no command before:\n{table}"
        assert table in docs, f"this README table differs from the one in docs/results.md or docs/benchmarks.md:\n{table}"


def test_readme_links_resolve():
    s = text()
    anchors = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", s, re.M)}
    for target in re.findall(r"\]\(([^)\s]+)\)", s):
        if target.startswith(("http://", "https://")):
            continue
        if target.startswith("#"):
            assert target[1:] in anchors, target
            continue
        path = target.split("#")[0]
        assert (ROOT / path).exists(), f"README links to {target}, which does not exist"
