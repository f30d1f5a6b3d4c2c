"""A small sample corpus (MDS) shared by the training tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from composer_remask.tools.shared_memory import clean_unused_streaming_shared_memory
from tests.helpers.assets import TINY_TOKENIZER


@pytest.fixture(scope="session")
def sample_corpus(tmp_path_factory) -> dict[str, Path]:
    """Train corpus (tinycot + oasst2 + reddit, 48 rows each) and a held-out tinycot corpus."""
    from composer_remask.data.sources import parse_source_arg
    from composer_remask.data.writer import build_corpus
    from composer_remask.tools.fixtures import write_source_fixtures

    clean_unused_streaming_shared_memory()
    root = tmp_path_factory.mktemp("corpus")
    raw = write_source_fixtures(root / "raw", rows=48, seed=0)
    held_raw = write_source_fixtures(root / "heldout-raw", rows=24, seed=1)
    build_corpus([parse_source_arg(f"{name}={raw[name]}") for name in ("tinycot", "oasst2", "reddit")],
                 str(TINY_TOKENIZER), str(root / "train"), progress=False)
    build_corpus([parse_source_arg(f"tinycot={held_raw['tinycot']}")], str(TINY_TOKENIZER), str(root / "heldout"),
                 progress=False)
    return {"train": root / "train", "heldout": root / "heldout", "heldout_jsonl": held_raw["tinycot"]}
