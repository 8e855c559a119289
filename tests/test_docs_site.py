"""docs/ builds as the mkdocs site (mkdocs.yml) with warnings as errors, as CI builds it: a page left out of the nav,
a link to a missing page or anchor fails here, with mkdocs's warnings as the message. And its lists are written as
Python-Markdown (mkdocs) reads them, which GitHub's renderer does not need and mkdocs does not warn about."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

LIST_ITEM = re.compile(r"^( *)([-*+]|\d+\.) ")
FENCE = re.compile(r"^ *(```|~~~)")


def list_problems(text: str) -> list[str]:
    """The list items of a markdown page that mkdocs would not render as list items, one line each.

    Python-Markdown starts a list only after a blank line (a heading's line aside), else the items are the
    paragraph's running text; and it nests an item only when indented by 4 spaces a level (2, or 3 under "1. ",
    make it a sibling). A list item right after another one or after its continuation lines is in the same list.
    """
    problems, fenced, block = [], False, []  # block: the lines since the last blank one
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and not line.strip():
            block = []
            continue
        elif not fenced and (item := LIST_ITEM.match(line)):
            indent = len(item.group(1))
            if indent % 4:
                problems.append(f"line {number}: a nested list item indented by {indent} spaces, not a multiple of 4")
            elif block and not block[-1].startswith("#") and not any(LIST_ITEM.match(b) for b in block):
                problems.append(f"line {number}: a list right after {block[-1][:40]!r} without a blank line")
        if not fenced or FENCE.match(line):
            block.append(line)
    return problems


def test_list_problems_finds_what_mkdocs_renders_as_text():
    assert list_problems("Text:\n- a\n- b\n") == ["line 2: a list right after 'Text:' without a blank line"]
    assert list_problems("- a\n\n  more of a\n- b\n") == [
        "line 4: a list right after '  more of a' without a blank line"
    ]
    assert list_problems("```\ncode\n```\n- a\n") == ["line 4: a list right after '```' without a blank line"]
    assert list_problems("- a:\n  - b\n1. c\n   - d\n") == [
        "line 2: a nested list item indented by 2 spaces, not a multiple of 4",
        "line 4: a nested list item indented by 3 spaces, not a multiple of 4",
    ]
    fine = "Text:\n\n- a\ncontinued\n  and indented\n- b\n    - nested\n## Heading\n- c\n\n```\nText\n- code\n```\n"
    assert list_problems(fine) == []


def test_docs_lists_render_as_lists():
    problems = {
        page.name: found for page in sorted((REPO / "docs").glob("*.md")) if (found := list_problems(page.read_text()))
    }
    assert not problems, f"lists that mkdocs renders as running text (add a blank line, indent by 4): {problems}"


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None,
    reason='mkdocs or mkdocs-material is not installed (they come with the docs extra: pip install ".[docs]")',
)
def test_docs_build_strict_and_offline(tmp_path):
    site = tmp_path / "site"
    # NO_MKDOCS_2_WARNING: mkdocs-material prints a notice about its successor on every build; it is not a warning
    # of this build and would bury mkdocs's own messages in a failure.
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(site)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}{result.stderr}"

    pages = sorted(p.stem for p in (REPO / "docs").glob("*.md"))
    for page in pages:
        built = site / "index.html" if page == "index" else site / page / "index.html"
        assert built.is_file(), f"docs/{page}.md was not built into the site"
    # The site is read offline: the theme must not fetch fonts (theme.font: false) or anything else from the network.
    for html in site.rglob("*.html"):
        text = html.read_text(encoding="utf-8")
        assert "fonts.googleapis.com" not in text and "fonts.gstatic.com" not in text, html
        assert 'src="http' not in text and '<link rel="stylesheet" href="http' not in text, html
