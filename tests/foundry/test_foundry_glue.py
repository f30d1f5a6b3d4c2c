"""The objects llm-foundry builds through the entry points, exercised in this project's environment.

The runs through llm-foundry itself are in ``test_foundry_train.py`` (separate environment).
"""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerBase

from composer_remask.batch import MASK_TOKEN, REMASK_SPECIAL_TOKENS, TOKEN_ROLES_KEY, batch_loss_tokens
from composer_remask.data.tokenizer import load_tokenizer
from composer_remask.foundry import RemaskTokenizer, build_remask_dataloader, load_remask_tokenizer
from composer_remask.train import load_config
from composer_remask.train.builders import build_tokenizer, validate_sections
from tests.helpers.foundry_venv import OWN_SPECIAL_TOKEN
from tests.helpers.recipes import TINY_RECIPE


def _has_remask_tokens_and_its_own(tokenizer: PreTrainedTokenizerBase) -> None:
    vocab = tokenizer.get_vocab()
    assert all(token in vocab for token in REMASK_SPECIAL_TOKENS)
    assert set(REMASK_SPECIAL_TOKENS) <= set(tokenizer.all_special_tokens)
    assert OWN_SPECIAL_TOKEN in tokenizer.additional_special_tokens  # kept, not replaced
    # Special tokens are never split: the tag is one token.
    assert tokenizer(f"a{MASK_TOKEN}b", add_special_tokens=False)["input_ids"].count(vocab[MASK_TOKEN]) == 1


def test_registered_tokenizer_adds_remask_tokens_and_keeps_its_own(foundry_assets):
    # llm-foundry accepts a registered tokenizer only if it is a PreTrainedTokenizerBase subclass,
    # and builds it by calling it with the YAML's kwargs.
    assert issubclass(RemaskTokenizer, PreTrainedTokenizerBase)
    tokenizer = RemaskTokenizer(pretrained_model_name_or_path=str(foundry_assets["tokenizer"]), model_max_length=96)
    assert isinstance(tokenizer, PreTrainedTokenizerBase) and not isinstance(tokenizer, RemaskTokenizer)
    _has_remask_tokens_and_its_own(tokenizer)
    assert tokenizer.model_max_length == 96
    assert tokenizer.pad_token is not None
    # Same ids as the corpus builder's tokenizer (remask-data adds the tokens the same way).
    assert tokenizer.get_vocab() == load_remask_tokenizer(str(foundry_assets["tokenizer"])).get_vocab()


def test_own_recipes_add_remask_tokens_by_option(foundry_assets, tmp_path):
    base = str(foundry_assets["tokenizer"])
    _has_remask_tokens_and_its_own(load_tokenizer(base, add_remask_tokens=True))
    untouched = load_tokenizer(base, add_remask_tokens=False)
    assert MASK_TOKEN not in untouched.get_vocab() and OWN_SPECIAL_TOKEN in untouched.additional_special_tokens
    # From YAML: the key is part of the recipe's `tokenizer:` section and checked with it.
    cfg = load_config(TINY_RECIPE, [f"tokenizer.name={base}", "tokenizer.add_remask_tokens=true",
                                    f"variables.data_dir={tmp_path}", f"variables.eval_data_dir={tmp_path}",
                                    f"variables.run_dir={tmp_path}"])
    validate_sections(cfg)
    _has_remask_tokens_and_its_own(build_tokenizer(cfg))


def test_mds_loader_has_llm_foundry_signature_and_counts_loss_tokens(foundry_assets):
    tokenizer = load_remask_tokenizer(str(foundry_assets["tokenizer"]))
    # llm-foundry calls the builder with the section's keys, the tokenizer and the device batch size.
    spec = build_remask_dataloader(
        tokenizer=tokenizer, device_batch_size=4.0, num_workers=0, drop_last=True,
        dataset={"local": str(foundry_assets["corpus"] / "tinycot"), "max_seq_len": 128, "shuffle": False})
    batch = next(iter(spec.dataloader))
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 128
    assert TOKEN_ROLES_KEY in batch and batch[TOKEN_ROLES_KEY].shape == batch["input_ids"].shape
    assert spec.get_num_samples_in_batch(batch) == 4
    # What Composer weighs microbatches by under accumulate_train_batch_on_tokens (llm-foundry's default).
    assert spec.get_num_tokens_in_batch(batch, token_type="loss_generating") == batch_loss_tokens(batch) > 0
    assert spec.get_num_tokens_in_batch(batch, token_type="total") == int(batch["attention_mask"].sum())


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"dataset": {"local": "x", "num_workers": 2}}, "dataset.num_workers is a DataLoader setting"),
    ({"dataset": {"local": "x", "shuffel": True}}, "unknown data loader key 'shuffel'"),
    ({"dataset": {"local": "x"}, "device_batch_size": 2.5}, "whole number of samples"),
    ({"dataset": {"local": "x"}, "tokenizer": None}, "needs the run's `tokenizer:` section"),
])
def test_mds_loader_names_the_bad_setting(foundry_assets, kwargs, message):
    arguments = {"tokenizer": load_remask_tokenizer(str(foundry_assets["tokenizer"])), "device_batch_size": 2,
                 **kwargs}
    with pytest.raises(ValueError, match="remask_mds") as error:
        build_remask_dataloader(**arguments)
    assert message in str(error.value)


def test_mds_loader_refuses_a_recipe_shorter_than_the_corpus(foundry_assets):
    """The corpus was built with max_seq_len 128: a shorter loader would cut rows silently."""
    with pytest.raises(ValueError, match="remask_mds") as error:
        build_remask_dataloader(tokenizer=load_remask_tokenizer(str(foundry_assets["tokenizer"])), device_batch_size=2,
                                dataset={"local": str(foundry_assets["corpus"] / "tinycot"), "max_seq_len": 64})
    assert "64 is shorter than the max_seq_len 128" in str(error.value)
    assert "train_loader.dataset.max_seq_len: 128" in str(error.value)


def test_mds_loader_refuses_a_corpus_built_with_another_tokenizer(foundry_assets):
    from tests.helpers.assets import TINY_TOKENIZER

    with pytest.raises(ValueError, match="remask_mds") as error:
        build_remask_dataloader(tokenizer=load_remask_tokenizer(str(TINY_TOKENIZER)), device_batch_size=2,
                                dataset={"local": str(foundry_assets["corpus"] / "tinycot"), "max_seq_len": 128})
    message = str(error.value)
    assert "is not the one" in message and str(foundry_assets["corpus"] / "manifest.json") in message
    assert "tokenizer: {name: remask_tokenizer" in message
