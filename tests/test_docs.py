"""The documentation's form: a short README, no commit hashes or paths outside the repository,
and every relative link resolving to a file (and heading) of the repository."""

import re
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted([README, *(ROOT / "docs").glob("*.md"), ROOT / "tools" / "README.md"])

README_MAX_LINES = 200
# a commit hash: 7 to 40 lowercase hex digits with at least one digit and one letter, standing
# alone (not inside a word, a number or a file name such as resnet50-0676ba61.pth)
HASH = re.compile(r"(?<![\w.-])(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}(?![\w-])")
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def ids(paths: List[Path]) -> List[str]:
    return [str(p.relative_to(ROOT)) for p in paths]


def prose_lines(path: Path) -> Iterator[Tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path, cache: Dict[Path, Set[str]] = {}) -> Set[str]:
    if path not in cache:
        found: Set[str] = set()
        for _, line in prose_lines(path):
            match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
            if match:
                base = slug(match.group(1))
                name, n = base, 0
                while name in found:
                    n += 1
                    name = f"{base}-{n}"
                found.add(name)
        cache[path] = found
    return cache[path]


def test_docs_exist():
    names = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert {"install.md", "getting_started.md", "testing.md", "troubleshooting.md"} <= names
    assert (ROOT / "tools" / "README.md").is_file()


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES})"


@pytest.mark.parametrize("path", DOCS, ids=ids(DOCS))
def test_no_commit_hashes(path):
    hits = [
        f"{path.name}:{number}: {match.group(0)}"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        for match in HASH.finditer(line)
    ]
    assert not hits, "commit hashes (describe the version instead):\n" + "\n".join(hits)


@pytest.mark.parametrize("path", DOCS, ids=ids(DOCS))
def test_no_paths_outside_the_repository(path):
    hits = [
        f"{path.name}:{number}: {line.strip()}"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "../shared" in line
    ]
    assert not hits, "paths outside the repository (name the flag instead):\n" + "\n".join(hits)


@pytest.mark.parametrize("path", DOCS, ids=ids(DOCS))
def test_relative_links_resolve(path):
    broken = []
    for number, line in prose_lines(path):
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                broken.append(f"{path.name}:{number}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{path.name}:{number}: {target} (no such heading)")
            elif ROOT not in linked.parents and linked != ROOT:
                broken.append(f"{path.name}:{number}: {target} (outside the repository)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_hash_pattern():
    assert HASH.search("at commit 171f2e6 (before)")
    assert HASH.search("f99f3f2, then 4ba44b8")
    for text in ("resnet50-0676ba61.pth", "000000142238.jpg", "model_0041999.pth", "defaced"):
        assert not HASH.search(text), text
