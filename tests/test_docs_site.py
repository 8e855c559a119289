"""docs/ builds as the mkdocs site (mkdocs.yml) with warnings as errors, as CI builds it: a page left out of the nav,
a link to a missing page or anchor fails here, with mkdocs's warnings as the message."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
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
