"""Collator: rows of token ids and roles -> the batch contract (docs/design.md#batch-contract).

Output keys: ``input_ids`` (int64 B x T), ``attention_mask`` (int64), ``labels`` (int64, unshifted,
= input_ids where the role is predicted, -100 elsewhere and at padding) and ``token_roles`` (int8,
``ROLE_PAD`` at padding). Padding is on the right.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from composer_remask.batch import (
    IGNORE_INDEX,
    PREDICTED_ROLES,
    ROLE_CONTEXT,
    ROLE_PAD,
    ROLE_RESPONSE,
    TOKEN_ROLES_KEY,
)

PAD_TO_CHOICES = ("longest", "max_seq_len")


class RemaskCollator:
    """Pads rows ``{'input_ids', 'token_roles', ...}`` into a batch; extra row keys are ignored.

    ``pad_to="longest"`` pads to the batch's longest row (at most ``max_seq_len``);
    ``pad_to="max_seq_len"`` always pads to ``max_seq_len`` (fixed shapes). Rows longer than
    ``max_seq_len`` keep their first ``max_seq_len`` tokens. Rows without ``token_roles`` but with
    ``labels`` (ordinary pre-tokenized fine-tuning data) are accepted: labelled positions count as
    responses, the rest as context.
    """

    def __init__(self, pad_token_id: int, max_seq_len: int | None = None, pad_to: str = "longest") -> None:
        if pad_to not in PAD_TO_CHOICES:
            raise ValueError(f"pad_to must be one of {PAD_TO_CHOICES}, got {pad_to!r}")
        if pad_to == "max_seq_len" and max_seq_len is None:
            raise ValueError("pad_to='max_seq_len' needs max_seq_len")
        if max_seq_len is not None and max_seq_len < 1:
            raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
        self.pad_token_id = int(pad_token_id)
        self.max_seq_len = max_seq_len
        self.pad_to = pad_to

    def _row_arrays(self, row: Mapping[str, Any], index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        input_ids = np.asarray(row["input_ids"], dtype=np.int64).reshape(-1)
        if TOKEN_ROLES_KEY in row:
            roles = np.asarray(row[TOKEN_ROLES_KEY], dtype=np.int8).reshape(-1)
            labels = np.where(np.isin(roles, PREDICTED_ROLES), input_ids, IGNORE_INDEX)
        elif "labels" in row:
            labels = np.asarray(row["labels"], dtype=np.int64).reshape(-1)
            roles = np.where(labels != IGNORE_INDEX, ROLE_RESPONSE, ROLE_CONTEXT).astype(np.int8)
        else:
            raise KeyError(f"row {index} has neither '{TOKEN_ROLES_KEY}' nor 'labels'")
        if len(roles) != len(input_ids) or len(labels) != len(input_ids):
            raise ValueError(f"row {index}: input_ids, roles and labels differ in length "
                             f"({len(input_ids)}, {len(roles)}, {len(labels)})")
        if self.max_seq_len is not None:
            input_ids, roles, labels = (a[:self.max_seq_len] for a in (input_ids, roles, labels))
        return input_ids, roles, labels

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("cannot collate an empty batch")
        arrays = [self._row_arrays(row, index) for index, row in enumerate(rows)]
        if self.pad_to == "max_seq_len":
            assert self.max_seq_len is not None
            length = self.max_seq_len
        else:
            length = max(len(ids) for ids, _, _ in arrays)
        batch_size = len(arrays)
        input_ids = np.full((batch_size, length), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((batch_size, length), dtype=np.int64)
        labels = np.full((batch_size, length), IGNORE_INDEX, dtype=np.int64)
        token_roles = np.full((batch_size, length), ROLE_PAD, dtype=np.int8)
        for i, (ids, roles, row_labels) in enumerate(arrays):
            n = len(ids)
            input_ids[i, :n] = ids
            attention_mask[i, :n] = 1
            labels[i, :n] = row_labels
            token_roles[i, :n] = roles
        return {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.from_numpy(labels),
            TOKEN_ROLES_KEY: torch.from_numpy(token_roles),
        }
