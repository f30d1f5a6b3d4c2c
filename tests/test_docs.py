"""The README is a document a user can trust: every path it names exists, and it cites nothing
outside the repository."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


# ``python bench/x.py`` or ``python -m bench.x`` as the documents write it (``.venv/bin/python`` too).
DOCUMENTED_BENCH_COMMAND = re.compile(r"python3? +(?:(-m) +(bench(?:\.\w+)+)|((?:bench|scripts)/\w+\.py))")


def documented_bench_commands() -> dict[tuple[str, ...], str]:
    """Each bench or script command the README, docs, recipes and bench docstrings give, with where it is written."""
    documents = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "yamls").glob("*.yaml")),
                 *sorted((REPO / "bench").rglob("*.py")), *sorted((REPO / "scripts").glob("*.py"))]
    commands: dict[tuple[str, ...], str] = {}
    for document in documents:
        for number, line in enumerate(document.read_text(encoding="utf-8").splitlines(), start=1):
            for flag, module, script in DOCUMENTED_BENCH_COMMAND.findall(line):
                command = ("-m", module) if flag else (script,)
                if script and not (REPO / script).exists():
                    continue   # a path the README test already reports
                commands.setdefault(command, f"{document.relative_to(REPO)}:{number}")
    return commands


def test_the_command_finder_reads_both_forms():
    found = DOCUMENTED_BENCH_COMMAND.findall("`.venv/bin/python -m bench.step_bench --fsdp`; `python bench/data_bench.py`")
    assert found == [("-m", "bench.step_bench", ""), ("", "", "bench/data_bench.py")]


@pytest.mark.slow
def test_every_bench_command_the_documents_give_starts():
    """A documented command that cannot import its own package fails before it parses an option:
    ``python bench/quality.py`` did, while the README gave it (the script imports ``bench.quality_task``)."""
    commands = documented_bench_commands()
    assert ("-m", "bench.quality") in commands
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    failed = []
    for command, where in sorted(commands.items()):
        result = subprocess.run([sys.executable, *command, "--help"], cwd=REPO, env=env, capture_output=True,
                                text=True)
        if result.returncode != 0:
            failed.append(f"{where}: python {' '.join(command)} --help exited {result.returncode}: "
                          f"{result.stderr.strip().splitlines()[-1:]}")
    assert not failed, "\n".join(failed)
