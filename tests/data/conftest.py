"""Fixtures of the data-pipeline tests: the committed tiny tokenizer, fixture files, fresh shared memory."""

from __future__ import annotations

from pathlib import Path

import pytest

from composer_remask.data.tokenizer import load_tokenizer
from composer_remask.tools.fixtures import write_source_fixtures
from composer_remask.tools.shared_memory import clean_unused_streaming_shared_memory
from tests.helpers.assets import TINY_TOKENIZER


@pytest.fixture(scope="session")
def asset_tokenizer():
    """The committed assets/tiny-tokenizer, loaded the way `remask-data build` loads tokenizers."""
    return load_tokenizer(str(TINY_TOKENIZER))


@pytest.fixture(scope="session")
def fixture_files(tmp_path_factory) -> dict[str, Path]:
    return write_source_fixtures(tmp_path_factory.mktemp("fixtures"), rows=24, seed=0)


@pytest.fixture
def fresh_shm():
    """Streaming tests start without the shared memory a crashed run left behind (live runs' is kept)."""
    clean_unused_streaming_shared_memory()
