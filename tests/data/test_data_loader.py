"""Collator and dataloader: the batch contract, loader config checking, token counts, a real Trainer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from composer_remask.batch import (
    IGNORE_INDEX,
    ROLE_ANSWER,
    ROLE_CONTEXT,
    ROLE_PAD,
    ROLE_RATIONALE,
    ROLE_RESPONSE,
    num_loss_tokens,
)
from composer_remask.data.collator import RemaskCollator
from composer_remask.data.dataset import build_dataloader, get_num_tokens_in_batch
from composer_remask.data.sources import SourceSpec
from composer_remask.data.writer import build_corpus

C, R, T, A = ROLE_CONTEXT, ROLE_RESPONSE, ROLE_RATIONALE, ROLE_ANSWER


def row(ids: list[int], roles: list[int], **extra) -> dict:
    return {"input_ids": np.array(ids, np.int32), "token_roles": np.array(roles, np.int8), **extra}


def test_collator_pads_to_longest_with_labels_only_on_predicted_roles():
    batch = RemaskCollator(pad_token_id=0)([row([5, 6, 7, 8, 9], [C, C, T, A, A], source="tinycot"),
                                            row([5, 6, 7], [C, R, R])])
    assert set(batch) == {"input_ids", "attention_mask", "labels", "token_roles"}
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8, 9], [-100, 6, 7, -100, -100]]
    assert batch["token_roles"].tolist() == [[C, C, T, A, A], [C, R, R, ROLE_PAD, ROLE_PAD]]
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["attention_mask"].dtype == torch.int64
    assert batch["token_roles"].dtype == torch.int8


def test_collator_caps_at_max_seq_len_or_pads_to_it():
    rows = [row([1, 2, 3, 4, 5, 6], [C, C, R, R, R, R]), row([1, 2], [C, R])]
    capped = RemaskCollator(pad_token_id=9, max_seq_len=4)(rows)
    assert capped["input_ids"].tolist() == [[1, 2, 3, 4], [1, 2, 9, 9]]
    fixed = RemaskCollator(pad_token_id=9, max_seq_len=8, pad_to="max_seq_len")(rows)
    assert fixed["input_ids"].shape == (2, 8) and fixed["labels"][1].tolist() == [-100, 2] + [-100] * 6
    with pytest.raises(ValueError, match="needs max_seq_len"):
        RemaskCollator(pad_token_id=0, pad_to="max_seq_len")
    with pytest.raises(ValueError, match="pad_to"):
        RemaskCollator(pad_token_id=0, pad_to="multiple_of_8")


def test_collator_accepts_ordinary_rows_with_labels_instead_of_roles():
    batch = RemaskCollator(pad_token_id=0)([{"input_ids": [4, 5, 6], "labels": [-100, 5, 6]}])
    assert batch["token_roles"].tolist() == [[C, R, R]] and batch["labels"].tolist() == [[-100, 5, 6]]
    with pytest.raises(KeyError, match="neither"):
        RemaskCollator(pad_token_id=0)([{"input_ids": [4, 5, 6]}])


def test_token_counts_match_the_loss_count():
    batch = RemaskCollator(pad_token_id=0)([row([5, 6, 7, 8], [R, R, C, R]), row([5, 6], [C, R])])
    counts = get_num_tokens_in_batch(batch)
    # labels[:, 1:] != -100: row 0 positions 1 and 3; row 1 position 1 (position 0 never makes a loss).
    assert counts == {"total": 6, "loss_generating": 3} == {"total": 6, "loss_generating": num_loss_tokens(batch["labels"])}


@pytest.fixture
def small_corpus(asset_tokenizer, fixture_files, tmp_path):
    out = tmp_path / "corpus"
    build_corpus([SourceSpec("tinycot", "tinycot", str(fixture_files["tinycot"])),
                  SourceSpec("oasst2", "oasst2", str(fixture_files["oasst2"]))],
                 asset_tokenizer, str(out), max_seq_len=128, progress=False)
    return out


def test_unknown_loader_or_stream_keys_are_errors_naming_the_key(asset_tokenizer, small_corpus):
    with pytest.raises(ValueError, match="'batch_sise'"):
        build_dataloader({"local": str(small_corpus / "tinycot"), "batch_sise": 2}, asset_tokenizer, 2)
    with pytest.raises(ValueError, match="'weight' in stream 'tinycot'"):
        build_dataloader({"streams": {"tinycot": {"local": str(small_corpus / "tinycot"), "weight": 1}}},
                         asset_tokenizer, 2)
    with pytest.raises(ValueError, match="not both"):
        build_dataloader({"streams": {"t": {"local": "x"}}, "local": "y"}, asset_tokenizer, 2)


def test_streams_yaml_pastes_into_a_loader_section(asset_tokenizer, small_corpus, fresh_shm):
    section = yaml.safe_load((small_corpus / "streams.yaml").read_text())
    config = OmegaConf.create({**section, "max_seq_len": 128, "pad_to": "max_seq_len", "shuffle": True,
                               "shuffle_seed": 3, "drop_last": True})
    spec = build_dataloader(config, asset_tokenizer, device_batch_size=4)
    batches = list(spec.dataloader)
    assert len(batches) == (24 + 24) // 4
    for batch in batches:
        assert batch["input_ids"].shape == (4, 128)
        assert spec.get_num_samples_in_batch(batch) == 4
        assert spec.get_num_tokens_in_batch(batch, token_type="loss_generating") == num_loss_tokens(batch["labels"])
        assert spec.get_num_tokens_in_batch(batch) == int(batch["attention_mask"].sum())
        assert (batch["labels"] != IGNORE_INDEX).sum() > 0


def test_top_level_local_is_a_single_stream(asset_tokenizer, small_corpus, fresh_shm):
    spec = build_dataloader({"local": str(small_corpus / "oasst2"), "shuffle": False, "drop_last": False},
                            asset_tokenizer, device_batch_size=7)
    assert sum(b["input_ids"].shape[0] for b in spec.dataloader) == 24


def test_composer_trainer_with_remask_trains_on_the_built_corpus(asset_tokenizer, small_corpus, fresh_shm):
    """MDS built from the fixtures feeds a Trainer with ReMask()."""
    from composer import Trainer
    from composer.loggers import InMemoryLogger
    from composer.models import HuggingFaceModel
    from transformers import StableLmForCausalLM

    from composer_remask import ReMask
    from tests.helpers.tiny_model import tiny_stablelm_config

    torch.manual_seed(0)
    model = HuggingFaceModel(StableLmForCausalLM(tiny_stablelm_config(len(asset_tokenizer))),
                             tokenizer=asset_tokenizer, use_logits=True)
    section = yaml.safe_load((small_corpus / "streams.yaml").read_text())
    spec = build_dataloader({**section, "max_seq_len": 128, "shuffle_seed": 1}, asset_tokenizer, device_batch_size=4)
    logger = InMemoryLogger()
    trainer = Trainer(model=model, train_dataloader=spec, optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
                      max_duration="3ba", algorithms=[ReMask(loss_weighting="tokens", seed=0)], loggers=[logger],
                      device="cpu", device_train_microbatch_size=2, accumulate_train_batch_on_tokens=True,
                      progress_bar=False, seed=0)
    trainer.fit()
    totals = [float(value) for _, value in logger.data["loss/train/total"]]
    assert len(totals) == 3 and all(math.isfinite(t) and t > 0 for t in totals)
    assert int(trainer.state.timestamp.sample) == 12
