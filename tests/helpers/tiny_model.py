"""A tiny text sample and a tiny StableLM config, shared by fixtures, tests and subprocess scripts."""

from __future__ import annotations

from transformers import StableLmConfig

TINY_TEXT = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May? 48 / 2 = 24. 48 + 24 = 72.",
    "Explain why the sky is blue. Sunlight scatters off air molecules; blue light scatters most.",
    "What is 12 times 7? 12 * 7 = 84. The answer is 84.",
    "Write a haiku about autumn. Leaves fall, the wind hums, and the cold evening comes early.",
    "Is a tomato a fruit? Botanically yes: it develops from the flower and holds the seeds.",
] * 4


def tiny_stablelm_config(vocab_size: int, **overrides) -> StableLmConfig:
    """A StableLM-architecture config of a few hundred thousand parameters."""
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        partial_rotary_factor=0.25, bos_token_id=0, eos_token_id=0, use_cache=False,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return StableLmConfig(**kwargs)
