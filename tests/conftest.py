"""Shared fixtures: a tiny tokenizer trained offline and tiny StableLM models with random weights."""

from __future__ import annotations

import pytest
import torch
from transformers import StableLmForCausalLM

from composer_remask.data.tokenizer import train_tiny_tokenizer
from tests.helpers.tiny_model import TINY_TEXT, tiny_stablelm_config


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_tiny_tokenizer(TINY_TEXT, vocab_size=400)


@pytest.fixture
def tiny_model_factory(tiny_tokenizer):
    """Build a tiny StableLM with seeded random weights (same seed, same weights)."""

    def build(seed: int = 0, **overrides) -> StableLmForCausalLM:
        torch.manual_seed(seed)
        config = tiny_stablelm_config(len(tiny_tokenizer), **overrides)
        return StableLmForCausalLM(config).eval()

    return build
