"""Hand-built batches in the batch contract (docs/design.md#batch-contract), independent of the data pipeline."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from composer_remask.batch import (
    ANSWER_TAG,
    IGNORE_INDEX,
    PREDICTED_ROLES,
    RATIONALE_TAG,
    ROLE_ANSWER,
    ROLE_CONTEXT,
    ROLE_PAD,
    ROLE_RATIONALE,
    USER_TAG,
)


def ordinary_ids(tokenizer) -> torch.Tensor:
    special = set(tokenizer.all_special_ids)
    return torch.tensor([i for i in range(len(tokenizer)) if i not in special])


def cot_example(tokenizer, prompt_len: int, rationale_len: int, answer_len: int, seed: int, ordinary=None):
    """One CoT sequence (ids, roles) with random ordinary tokens between the real tags."""
    g = torch.Generator().manual_seed(seed)
    ordinary = ordinary_ids(tokenizer) if ordinary is None else ordinary

    def words(n):
        return ordinary[torch.randint(len(ordinary), (n,), generator=g)].tolist()

    tag = tokenizer.convert_tokens_to_ids
    ids, roles = [], []
    for piece, role in (([tag(USER_TAG)] + words(prompt_len) + [tag(RATIONALE_TAG)], ROLE_CONTEXT),
                        (words(rationale_len), ROLE_RATIONALE),
                        ([tag(ANSWER_TAG)] + words(answer_len) + [tokenizer.eos_token_id], ROLE_ANSWER)):
        ids += piece
        roles += [role] * len(piece)
    return ids, roles


def collate(examples, pad_id: int = 0):
    """Pad to the longest row: input_ids, attention_mask, labels (-100 off-target), token_roles."""
    width = max(len(ids) for ids, _ in examples)
    batch = {
        "input_ids": torch.full((len(examples), width), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(examples), width), dtype=torch.long),
        "labels": torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long),
        "token_roles": torch.full((len(examples), width), ROLE_PAD, dtype=torch.int8),
    }
    for row, (ids, roles) in enumerate(examples):
        n = len(ids)
        ids_t, roles_t = torch.tensor(ids), torch.tensor(roles, dtype=torch.int8)
        batch["input_ids"][row, :n] = ids_t
        batch["attention_mask"][row, :n] = 1
        batch["token_roles"][row, :n] = roles_t
        predicted = torch.isin(roles_t, torch.tensor(PREDICTED_ROLES, dtype=torch.int8))
        batch["labels"][row, :n] = torch.where(predicted, ids_t, torch.tensor(IGNORE_INDEX))
    return batch


class CoTDataset(Dataset):
    """Deterministic CoT examples of varied lengths (so token counts differ between samples)."""

    def __init__(self, tokenizer, n: int = 16, seed: int = 0):
        self.examples = []
        ordinary = ordinary_ids(tokenizer)
        for i in range(n):
            g = torch.Generator().manual_seed(seed * 1000 + i)
            lengths = torch.randint(3, 12, (3,), generator=g).tolist()
            self.examples.append(cot_example(tokenizer, lengths[0], lengths[1] + 4, lengths[2] % 4 + 1,
                                             seed * 1000 + i, ordinary))

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]
