"""The documentation's relative links resolve, and the project's pages name no work periods or issue numbers."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

PAGES = [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(page: Path) -> set[str]:
    """GitHub-style anchors of a page's headings."""
    out = set()
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            text = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(target)
    assert not broken, f"{page.relative_to(REPO)}: broken links {broken}"


def test_the_readme_is_short_and_shows_a_labelled_photo_early():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 300
    assert any(line.startswith("![") for line in lines[:60])


def test_no_work_periods_or_issue_numbers_in_the_project():
    out = subprocess.run(["git", "grep", "-inE", r"session [0-9]+|issue [0-9]+"],
                         cwd=REPO, capture_output=True, text=True)
    if out.returncode == 128:
        pytest.skip("not a git checkout")
    assert out.stdout == "", out.stdout


def _ferlab_commands(page: Path) -> list[str]:
    """The ``ferlab ...`` commands of a page's bash blocks (continuations joined, comments and [optional] parts
    dropped, pipelines and ``&&`` chains split)."""
    import shlex

    out = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            line = re.sub(r"\[[^\]]*\]", "", line)
            for part in re.split(r"&&|;|\|(?![^\s]*\|)", line):
                words = shlex.split(part.replace(">>", " >>").replace(">", " > "), comments=False)
                words = words[: words.index(">")] if ">" in words else words
                words = [w for w in words if w not in ("nohup", "&")]
                if words and words[0].endswith("ferlab") and len(words) > 1:
                    out.append(" ".join(shlex.quote(w) for w in words[1:]))
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_ferlab_command_the_docs_show_parses(page):
    """Each shown command names a real sub-command and real flags (the parser accepts it; nothing runs)."""
    import shlex

    from ferlab.cli import build_parser

    bad = []
    for cmd in _ferlab_commands(page):
        try:
            build_parser().parse_args(shlex.split(cmd))
        except SystemExit:
            bad.append(cmd)
    assert not bad, f"{page.relative_to(REPO)}: commands the parser refuses: {bad}"
