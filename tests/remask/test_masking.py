"""Masking rules, label rules and their determinism (what a sample's masks may depend on)."""

from __future__ import annotations

import pytest
import torch

from composer_remask.batch import (
    IGNORE_INDEX,
    ROLE_ANSWER,
    ROLE_CONTEXT,
    ROLE_PAD,
    ROLE_RATIONALE,
    ROLE_RESPONSE,
)
from composer_remask.remask.masking import MaskVocabulary, content_sample_keys, remask_batch
from tests.helpers.synthetic import CoTDataset, collate

MASK_ID = 404


@pytest.fixture
def cot_batch(tiny_tokenizer):
    return collate([CoTDataset(tiny_tokenizer, n=64)[i] for i in range(64)])


def protected(tokenizer):
    return torch.tensor(tokenizer.all_special_ids)


def vocab(tokenizer, **kwargs):
    return MaskVocabulary(**{"mask_token_id": MASK_ID, "protected_ids": protected(tokenizer), **kwargs})


def test_mask_rate_matches_probability_and_never_touches_other_roles(cot_batch, tiny_tokenizer):
    out = remask_batch(cot_batch["input_ids"], cot_batch["labels"], cot_batch["token_roles"],
                       cot_batch["attention_mask"], mask_prob=0.4, vocabulary=vocab(tiny_tokenizer), seed=3)
    roles = cot_batch["token_roles"]
    changed = out.masked_input_ids != cot_batch["input_ids"]
    assert torch.equal(changed, out.input_mask)
    assert (out.masked_input_ids[changed] == MASK_ID).all()
    for role in (ROLE_CONTEXT, ROLE_ANSWER, ROLE_PAD):
        assert not changed[roles == role].any()
    tags = torch.isin(cot_batch["input_ids"], protected(tiny_tokenizer))
    assert not changed[tags].any()
    maskable = (roles == ROLE_RATIONALE) & ~tags
    rate = changed[maskable].float().mean().item()
    n = int(maskable.sum())
    assert abs(rate - 0.4) < 4 * (0.4 * 0.6 / n) ** 0.5, (rate, n)


def test_without_roles_every_labelled_position_is_a_response(cot_batch, tiny_tokenizer):
    out = remask_batch(cot_batch["input_ids"], cot_batch["labels"], None, cot_batch["attention_mask"],
                       mask_prob=1.0, vocabulary=vocab(tiny_tokenizer))
    labelled = cot_batch["labels"] != IGNORE_INDEX
    tags = torch.isin(cot_batch["input_ids"], protected(tiny_tokenizer))
    assert torch.equal(out.input_mask, labelled & ~tags)


def test_random_replacement_never_yields_special_tokens(cot_batch, tiny_tokenizer):
    special = protected(tiny_tokenizer)
    everything = torch.arange(len(tiny_tokenizer))
    candidates = everything[~torch.isin(everything, special)]
    out = remask_batch(cot_batch["input_ids"], cot_batch["labels"], cot_batch["token_roles"],
                       mask_prob=1.0, seed=1,
                       vocabulary=vocab(tiny_tokenizer, strategy="random", random_candidates=candidates))
    replaced = out.masked_input_ids[out.input_mask]
    assert replaced.numel() > 100
    assert not torch.isin(replaced, special).any()
    assert replaced.unique().numel() > 50  # spread over the vocabulary, not one id


def test_pad_strategy_uses_pad_id(cot_batch, tiny_tokenizer):
    out = remask_batch(cot_batch["input_ids"], cot_batch["labels"], cot_batch["token_roles"],
                       mask_prob=0.5, vocabulary=vocab(tiny_tokenizer, strategy="pad", pad_token_id=7))
    assert (out.masked_input_ids[out.input_mask] == 7).all() and out.input_mask.any()


def test_label_rules_drop_rationale_only(cot_batch, tiny_tokenizer):
    roles, labels = cot_batch["token_roles"], cot_batch["labels"]
    out = remask_batch(cot_batch["input_ids"], labels, roles, mask_prob=0.0, rationale_label_drop_prob=0.3,
                       answer_only_prob=0.0, vocabulary=vocab(tiny_tokenizer), seed=5)
    answer = roles == ROLE_ANSWER
    assert torch.equal(out.labels[answer], labels[answer])  # answer labels never dropped
    rationale = (roles == ROLE_RATIONALE) & (labels != IGNORE_INDEX)
    dropped = (out.labels == IGNORE_INDEX) & rationale
    rate = dropped[rationale].float().mean().item()
    assert abs(rate - 0.3) < 4 * (0.3 * 0.7 / int(rationale.sum())) ** 0.5
    # the divergence still covers every position predicted before the drops
    assert torch.equal(out.divergence_mask, labels != IGNORE_INDEX)


def test_answer_only_drops_whole_rationales(tiny_tokenizer):
    batch = collate([CoTDataset(tiny_tokenizer, n=400)[i] for i in range(400)])
    roles, labels = batch["token_roles"], batch["labels"]
    out = remask_batch(batch["input_ids"], labels, roles, mask_prob=0.0, rationale_label_drop_prob=0.0,
                       answer_only_prob=0.25, seed=9)
    rationale = roles == ROLE_RATIONALE
    kept = ((out.labels != IGNORE_INDEX) & rationale).sum(1)
    total = ((labels != IGNORE_INDEX) & rationale).sum(1)
    all_dropped = kept == 0
    assert torch.equal(kept[~all_dropped], total[~all_dropped])  # either all or nothing per example
    frac = all_dropped.float().mean().item()
    assert abs(frac - 0.25) < 4 * (0.25 * 0.75 / 400) ** 0.5
    assert torch.equal(out.labels[roles == ROLE_ANSWER], labels[roles == ROLE_ANSWER])


@pytest.mark.parametrize("rows", [list(range(10, 14)), [3, 21, 40, 63], [63, 1, 32]])
def test_masks_depend_on_sample_content_not_on_place_split_or_padding(cot_batch, tiny_tokenizer, rows):
    """Any subset, in any order, re-padded (contiguous ranks, interleaved samplers), draws the same masks."""
    kwargs = dict(mask_prob=0.4, vocabulary=vocab(tiny_tokenizer), rationale_label_drop_prob=0.2,
                  answer_only_prob=0.2, seed=11, batch_index=7)
    whole = remask_batch(cot_batch["input_ids"], cot_batch["labels"], cot_batch["token_roles"],
                         cot_batch["attention_mask"], **kwargs)
    width = int(cot_batch["attention_mask"][rows].sum(1).max())
    part = remask_batch(cot_batch["input_ids"][rows, :width], cot_batch["labels"][rows, :width],
                        cot_batch["token_roles"][rows, :width], cot_batch["attention_mask"][rows, :width], **kwargs)
    assert torch.equal(part.masked_input_ids, whole.masked_input_ids[rows, :width])
    assert torch.equal(part.labels, whole.labels[rows, :width])
    # Another batch index or seed draws other masks.
    other = remask_batch(cot_batch["input_ids"], cot_batch["labels"], cot_batch["token_roles"],
                         **{**kwargs, "batch_index": 8})
    assert not torch.equal(other.input_mask, whole.input_mask)


def test_content_keys_ignore_padding_but_not_tokens(cot_batch):
    ids, attention = cot_batch["input_ids"][:4], cot_batch["attention_mask"][:4]
    keys = content_sample_keys(ids, attention)
    wider = torch.nn.functional.pad(ids, (0, 5), value=0)
    assert content_sample_keys(wider, torch.nn.functional.pad(attention, (0, 5))) == keys
    assert content_sample_keys(wider, None, pad_token_id=0) == content_sample_keys(ids, None, pad_token_id=0)
    changed = ids.clone()
    changed[0, 1] += 1
    assert content_sample_keys(changed, attention)[1:] == keys[1:] and content_sample_keys(changed, attention)[0] != keys[0]
    assert len(set(keys)) == 4


def test_no_maskable_token_and_all_masked_are_fine(tiny_tokenizer):
    ids = torch.tensor([[400, 5, 6, 403, 7, 0]])
    roles = torch.tensor([[ROLE_CONTEXT] * 4 + [ROLE_ANSWER] * 2], dtype=torch.int8)
    labels = torch.tensor([[-100, -100, -100, -100, 7, 0]])
    out = remask_batch(ids, labels, roles, mask_prob=1.0, vocabulary=vocab(tiny_tokenizer))
    assert not out.input_mask.any() and torch.equal(out.masked_input_ids, ids)
    roles = torch.tensor([[ROLE_CONTEXT, ROLE_RESPONSE, ROLE_RESPONSE, ROLE_RESPONSE, ROLE_RESPONSE, ROLE_RESPONSE]],
                         dtype=torch.int8)
    labels = ids.masked_fill(roles == ROLE_CONTEXT, -100)
    out = remask_batch(ids, labels, roles, mask_prob=1.0, vocabulary=vocab(tiny_tokenizer))
    # every non-tag response token is masked; tags (403, EOS 0) stay
    assert out.masked_input_ids.tolist() == [[400, MASK_ID, MASK_ID, 403, MASK_ID, 0]]


def test_invalid_arguments_are_clear_errors(cot_batch):
    with pytest.raises(ValueError, match="mask_token_id"):
        remask_batch(cot_batch["input_ids"], cot_batch["labels"], mask_prob=0.5)
    with pytest.raises(ValueError, match="shape"):
        remask_batch(cot_batch["input_ids"][:, :-1], cot_batch["labels"], mask_prob=0.5,
                     vocabulary=MaskVocabulary(mask_token_id=1))
    with pytest.raises(ValueError, match="unknown mask_strategy"):
        MaskVocabulary(strategy="zero")
