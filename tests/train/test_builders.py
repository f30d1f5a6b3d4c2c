"""Every recipe builds its objects on CPU; the model wrapper's FSDP policies and FLOP count."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import StableLmConfig, StableLmForCausalLM

from composer_remask import ReMask
from composer_remask.optim import Lilith, OneCycleCosineScheduler
from composer_remask.train import load_config
from composer_remask.train.builders import (
    build_algorithms,
    build_batch_sizes,
    build_callbacks,
    build_loaders,
    build_model,
    build_optimizer,
    build_scheduler,
    build_tokenizer,
    validate_sections,
)
from composer_remask.train.transforms import apply_cross_section_rules
from tests.helpers.recipes import REPO, TINY_RECIPE, TINY_TOKENIZER, tiny_overrides

# StableLM-3B-4e1t's architecture (its model card and config.json): 2,795,443,200 parameters.
STABLELM_3B = dict(vocab_size=50304, hidden_size=2560, intermediate_size=6912, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=32, partial_rotary_factor=0.25,
                   rope_theta=10000, max_position_embeddings=4096, layer_norm_eps=1e-5,
                   tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)


def test_tiny_recipe_builds_every_object(sample_corpus, tmp_path):
    cfg = load_config(TINY_RECIPE, tiny_overrides(sample_corpus, tmp_path))
    validate_sections(cfg)
    tokenizer = build_tokenizer(cfg)
    assert "<|mask|>" in tokenizer.get_vocab()
    sizes = build_batch_sizes(cfg, world_size=1)
    train, evaluation = build_loaders(cfg, tokenizer, sizes)
    batch = next(iter(train.dataloader))
    assert batch["input_ids"].shape[0] == 16
    assert {"input_ids", "attention_mask", "labels", "token_roles"} <= set(batch)
    assert evaluation is not None
    model = build_model(cfg, tokenizer)
    assert 3_000_000 < model.num_parameters < 6_000_000 and not model.config.use_cache
    assert model.model.get_input_embeddings().num_embeddings >= len(tokenizer)
    optimizer = build_optimizer(cfg, model)
    assert isinstance(optimizer, Lilith) and not optimizer.sharded
    assert isinstance(build_scheduler(cfg), OneCycleCosineScheduler)
    (remask,) = build_algorithms(cfg)
    assert isinstance(remask, ReMask) and remask.mask_prob == 0.4 and remask.loss_weighting == "auto"
    assert {type(c).__name__ for c in build_callbacks(cfg)} == {"SpeedMonitor", "LRMonitor"}
    outputs = model(batch)
    assert outputs.logits.shape[:2] == batch["input_ids"].shape


@pytest.mark.parametrize("recipe", ["remask_3b", "masked_thought_3b", "sft_3b"])
def test_3b_recipe_builds_on_cpu_without_weights(recipe, tmp_path):
    """The recipe as written (its model name path), with the architecture read from a local config
    file instead of the hub and built on the meta device: no 2.8B parameters are allocated."""
    config_dir = tmp_path / "stablelm-3b-4e1t"
    StableLmConfig(**STABLELM_3B).save_pretrained(config_dir)
    cfg = load_config(REPO / f"yamls/{recipe}.yaml", [
        f"model.pretrained_model_name_or_path={config_dir}", "model.pretrained=false",
        f"tokenizer.name={TINY_TOKENIZER}"])
    cfg = apply_cross_section_rules(cfg, cuda_available=True)
    validate_sections(cfg, cuda_available=True)
    tokenizer = build_tokenizer(cfg)
    model = build_model(cfg, tokenizer, init_device="meta")
    assert model.num_parameters == 2_795_443_200
    assert not model.get_metrics(is_train=True) and set(model.get_metrics()) == {"LanguageCrossEntropy",
                                                                                 "LanguagePerplexity"}
    layers = [m for m in model.model.modules() if model.model.fsdp_wrap_fn(m)]
    assert len(layers) == 32 and all(type(m).__name__ == "StableLmDecoderLayer" for m in layers)
    assert model.model.activation_checkpointing_fn is model.model.fsdp_wrap_fn
    assert not model.model.fsdp_wrap_fn(model.model.lm_head)  # lm_head stays in the root FSDP unit
    # PaLM: per token 6 N + 12 L d T; a 16 x 256 microbatch, one pass.
    batch = {"input_ids": torch.zeros(16, 256, dtype=torch.long)}
    assert model.flops_per_batch(batch) == (6 * 2_795_443_200 + 12 * 32 * 2560 * 256) * 16 * 256
    optimizer = build_optimizer(cfg, model)
    assert isinstance(optimizer, Lilith) and optimizer.sharded
    algorithms = build_algorithms(cfg)
    assert algorithms[0].two_pass == (recipe != "sft_3b")


def test_pretrained_path_loads_weights(tmp_path):
    """``pretrained: true`` goes through AutoModelForCausalLM.from_pretrained (the hub path, offline)."""
    torch.manual_seed(0)
    saved = StableLmForCausalLM(StableLmConfig(**{**STABLELM_3B, "vocab_size": 2112, "hidden_size": 64,
                                                  "intermediate_size": 128, "num_hidden_layers": 2,
                                                  "num_attention_heads": 4, "num_key_value_heads": 4}))
    saved.save_pretrained(tmp_path / "model")
    cfg = load_config(REPO / "yamls/remask_3b.yaml", [
        f"model.pretrained_model_name_or_path={tmp_path / 'model'}", f"tokenizer.name={TINY_TOKENIZER}",
        "model.config_overrides={attention_dropout: 0.0}"])
    model = build_model(cfg, build_tokenizer(cfg))
    torch.testing.assert_close(model.model.lm_head.weight, saved.lm_head.weight)
    assert json.loads((tmp_path / "model" / "config.json").read_text())["hidden_size"] == 64


def test_embeddings_grow_for_the_special_tokens(tmp_path):
    cfg = load_config(TINY_RECIPE, ["model.config.vocab_size=2000"])
    tokenizer = build_tokenizer(cfg)
    model = build_model(cfg, tokenizer)
    rows = model.model.get_input_embeddings().num_embeddings
    assert rows >= len(tokenizer) and rows % 64 == 0
