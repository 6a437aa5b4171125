"""The operator's guide (docs/guide/) builds, and its walk-throughs run as
written: every command, what it prints and its exit status
(tests/guide.py says how a page states them)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import guide

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs" / "guide").glob("*.md"))
#: every page's walk-throughs, each titled with its page
WALKS = [w for page in PAGES for w in guide.walkthroughs(page.read_text(), page.stem)]


def test_the_guide_has_walkthroughs():
    assert len(WALKS) >= 3 and all(w.steps for w in WALKS)
    assert {w.title.split(": ")[0] for w in WALKS} >= {"running", "monitoring"}


def test_every_page_is_in_the_nav():
    """A page left out of mkdocs.yml's nav is built but found by no reader."""
    nav = (ROOT / "mkdocs.yml").read_text()
    assert [p.name for p in PAGES if f": {p.name}" not in nav] == []


@pytest.mark.slow
@pytest.mark.parametrize("walk", WALKS, ids=[w.title for w in WALKS])
def test_walkthrough(walk, tmp_path):
    for tool in ("qemu-io", "curl"):
        if any(s.command.startswith(tool) for s in walk.steps):
            assert shutil.which(tool), f"{tool} is needed (.ci/run installs it)"
    guide.run(walk, tmp_path)


@pytest.mark.slow
def test_the_guide_builds(tmp_path):
    """``mkdocs build --strict``: every page renders, no broken link."""
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q",
                        "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "site" / "index.html").exists()


# -- the runner itself ------------------------------------------------------------------
def test_the_matcher():
    m = guide.matches
    assert m(["a", "b"], ["a", "b"]) and not m(["a", "b"], ["a", "c"])
    assert m(["...", "b"], ["x", "y", "b"]) and m(["...", "b"], ["b"])
    assert m(["a ... c"], ["a bbb c"]) and not m(["a ... c"], ["a bbb d"])
    assert m(["a", "..."], ["a"]) and not m(["a"], ["a", "b"])
    assert m(["x (1.0)"], ["x (1.0)"]) and not m(["x (1.0)"], ["x (1x0)"])


def test_a_walkthrough_that_differs_fails(tmp_path):
    walk = guide.walkthroughs("## w\n```console\n$ echo one\ntwo\n```\n")[0]
    with pytest.raises(AssertionError, match="line 3: `echo one`"):
        guide.run(walk, tmp_path)
    walk = guide.walkthroughs("## w\n```console\n$ false\n```\n")[0]
    with pytest.raises(AssertionError, match="exited 1"):
        guide.run(walk, tmp_path)
    walk = guide.walkthroughs("## w\n```console\n$ false\n[exit 1]\n$ echo a b\na ...\n```\n")[0]
    guide.run(walk, tmp_path)
