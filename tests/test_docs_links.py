"""Every relative Markdown link in the repository's docs reaches a file, and its #anchor a heading
there (GitHub's anchors: the heading lowercased, punctuation dropped, spaces as hyphens). The docs
cite their figures by link (docs/architecture.md -> bench/results/), so a moved heading must not
leave a link behind."""
from __future__ import annotations

import re
from pathlib import Path

from tests.helpers import REPO

SKIP_DIRS = {".venv", "node_modules", ".git", ".pytest_cache", "runs", "build"}
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _slug(heading: str) -> str:
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(md: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for m in re.finditer(r"^#{1,6}\s+(.+)$", FENCE.sub("", md.read_text()), re.M):
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def broken_links(root: Path) -> list[str]:
    """``file: target: why`` for each relative link under ``root`` that leads nowhere."""
    bad = []
    for md in sorted(root.rglob("*.md")):
        if SKIP_DIRS & set(md.relative_to(root).parts):
            continue
        for m in LINK.finditer(FENCE.sub("", md.read_text())):
            target = m.group(1)
            if re.match(r"[a-z][a-z0-9+.-]*:", target):   # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (md.parent / path) if path else md
            where = f"{md.relative_to(root)}: {target}"
            if not dest.exists():
                bad.append(f"{where}: no such file")
            elif anchor and dest.is_file() and anchor not in _anchors(dest):
                bad.append(f"{where}: no heading with that anchor")
    return bad


def test_every_relative_link_in_the_docs_resolves() -> None:
    assert broken_links(REPO) == []


def test_the_check_finds_a_broken_file_and_anchor(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# Results, December 2026\n## 2026-12-01: the phone layouts\n")
    (tmp_path / "b.md").write_text("[ok](a.md#2026-12-01-the-phone-layouts) [self](#x) [web](https://example.com)\n"
                                   "[gone](c.md) [moved](a.md#phone-calls)\n\n# X\n```\n[in code](nowhere.md)\n```\n")
    assert broken_links(tmp_path) == ["b.md: c.md: no such file", "b.md: a.md#phone-calls: no heading with that anchor"]
