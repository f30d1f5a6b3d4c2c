"""The README is a document a user can trust: every path it names exists, and it cites nothing
outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
# Paths a command writes or a user supplies, and the keys Composer logs: not files of the repository.
NOT_A_REPOSITORY_PATH = re.compile(r"^(runs/|/tmp|llm-foundry/|loss/train/|remask/mask_)|[A-Z]{3,}")


def linked_paths(text: str) -> set[str]:
    """Targets of Markdown links and images that are not URLs or anchors."""
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    return {t.split("#")[0] for t in targets if not t.startswith(("http://", "https://", "#"))}


def quoted_paths(text: str) -> set[str]:
    """Backticked words with a ``/`` outside link labels (a label's short name is shown, its target checked)."""
    text = re.sub(r"\[[^\]]*\]\(", "(", text)
    found = set()
    for word in re.findall(r"`([^`\s]+)`", text):
        word = word.rstrip(",.")
        if "/" in word and not NOT_A_REPOSITORY_PATH.search(word) and "://" not in word and "=" not in word:
            found.add(word)
    return found


def layout_paths(text: str) -> set[str]:
    """The paths of the indented tree under ``## Layout`` (two spaces per level, names before the description)."""
    block = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    found: set[str] = set()
    parents: list[str] = []
    for line in block.splitlines():
        if not line.startswith("    ") or not line.strip():
            continue
        depth = (len(line) - len(line.lstrip(" ")) - 4) // 2
        names = re.split(r"\s{2,}", line.strip())[0]
        parents = parents[:depth]
        for name in (n.strip() for n in names.split(",")):
            if name:
                found.add("/".join([*parents, name.rstrip("/")]))
        if names.endswith("/"):
            parents.append(names.rstrip("/"))
    return found


def test_every_path_the_readme_names_exists():
    text = README.read_text(encoding="utf-8")
    candidates = linked_paths(text) | quoted_paths(text) | layout_paths(text)
    missing = sorted(path for path in candidates if not (REPO / path).exists())
    assert not missing, f"README.md names paths that do not exist: {missing}"


def test_the_checker_reads_the_layout_tree():
    text = "## Layout\n\n    a/\n      b.py      what\n      c/        more\n        d.py, e.py\n    f.sh\n\n## Next\n"
    assert layout_paths(text) == {"a", "a/b.py", "a/c", "a/c/d.py", "a/c/e.py", "f.sh"}


def test_the_readme_is_short_and_cites_nothing_outside_the_repository():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    assert not re.search(r"\bissues? #?\d+|(?<![\w/])#\d+\b|DESIGN|§|\.\./shared", text)


def test_every_link_in_the_docs_and_the_method_card_exists():
    documents = [*sorted((REPO / "docs").glob("*.md")), REPO / "composer_remask" / "remask" / "README.md"]
    missing = [f"{doc.relative_to(REPO)}: {target}" for doc in documents
               for target in sorted(linked_paths(doc.read_text(encoding="utf-8")))
               if target and not (doc.parent / target).exists()]
    assert not missing, missing
