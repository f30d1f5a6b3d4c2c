"""Paths of the repository's committed test assets (the package itself never points into the repo)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Rebuilt with `python -m composer_remask.tools.fixtures --tokenizer assets/tiny-tokenizer`.
TINY_TOKENIZER = REPO / "assets" / "tiny-tokenizer"
