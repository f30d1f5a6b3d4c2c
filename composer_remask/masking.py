"""Pure functions that decide what ReMask hides and what it predicts.

Every random draw for a sample comes from a generator seeded by (seed, batch index, the sample's
index in the global batch, stream), and draws one number per position from the start of the
sequence. A sample therefore gets the same masks whatever the microbatch size, the number of ranks
or the amount of padding, and a resumed run draws exactly what the uninterrupted run drew.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from composer_remask.batch import (
    IGNORE_INDEX,
    MASKABLE_ROLES,
    ROLE_CONTEXT,
    ROLE_PAD,
    ROLE_RATIONALE,
    ROLE_RESPONSE,
)

MASK_STRATEGIES = ("mask_token", "random", "pad")

# Independent random streams per sample; changing these values changes every mask drawn.
_STREAM_INPUT_MASK = 1
_STREAM_REPLACEMENT = 2
_STREAM_LABEL_DROP = 3
_STREAM_ANSWER_ONLY = 4

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, batch_index: int, sample_index: int, stream: int) -> int:
    """A 63-bit seed that depends only on its arguments (stable across processes and platforms)."""
    h = _splitmix64(seed & _MASK64)
    for value in (batch_index, sample_index, stream):
        h = _splitmix64(h ^ (value & _MASK64))
    return h & ((1 << 63) - 1)


def _generator(seed: int, batch_index: int, sample_index: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(sample_seed(seed, batch_index, sample_index, stream))


def _per_sample_uniform(
    shape: tuple[int, int], seed: int, batch_index: int, sample_indices: Sequence[int], stream: int,
) -> torch.Tensor:
    """Uniform [0, 1) draws, row i from the generator of sample ``sample_indices[i]``."""
    rows = [torch.rand(shape[1], generator=_generator(seed, batch_index, s, stream)) for s in sample_indices]
    return torch.stack(rows) if rows else torch.empty(shape)


def resolve_roles(
    labels: torch.Tensor, token_roles: torch.Tensor | None, attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Token roles of a batch; without ``token_roles`` every labelled position is a response token."""
    if token_roles is not None:
        if token_roles.shape != labels.shape:
            raise ValueError(f"token_roles has shape {tuple(token_roles.shape)} but labels has "
                             f"{tuple(labels.shape)}; they must match position for position.")
        return token_roles.to(torch.int8)
    roles = torch.where(labels != IGNORE_INDEX, ROLE_RESPONSE, ROLE_CONTEXT).to(torch.int8)
    if attention_mask is not None:
        roles = torch.where(attention_mask.bool(), roles, torch.tensor(ROLE_PAD, dtype=torch.int8))
    return roles


def apply_label_rules(
    labels: torch.Tensor,
    roles: torch.Tensor,
    *,
    rationale_label_drop_prob: float,
    answer_only_prob: float,
    seed: int,
    batch_index: int,
    sample_indices: Sequence[int],
) -> torch.Tensor:
    """ReMask-CoT label rules: drop rationale labels; answer labels are never touched.

    Each rationale label is dropped with ``rationale_label_drop_prob``; with ``answer_only_prob``
    per example every rationale label is dropped. Returns new labels (the input is not modified).
    """
    is_rationale = (roles == ROLE_RATIONALE) & (labels != IGNORE_INDEX)
    if not bool(is_rationale.any()) or (rationale_label_drop_prob <= 0 and answer_only_prob <= 0):
        return labels.clone()
    drop = torch.zeros_like(is_rationale)
    if rationale_label_drop_prob > 0:
        u = _per_sample_uniform(tuple(labels.shape), seed, batch_index, sample_indices, _STREAM_LABEL_DROP)
        drop |= u < rationale_label_drop_prob
    if answer_only_prob > 0:
        u = torch.stack([torch.rand(1, generator=_generator(seed, batch_index, s, _STREAM_ANSWER_ONLY))
                         for s in sample_indices])
        drop |= u < answer_only_prob
    return labels.masked_fill(drop & is_rationale, IGNORE_INDEX)


def maskable_positions(
    roles: torch.Tensor, input_ids: torch.Tensor, protected_token_ids: torch.Tensor | None,
) -> torch.Tensor:
    """Positions whose input may be replaced: response and rationale tokens that are not tags."""
    maskable = torch.isin(roles, torch.tensor(MASKABLE_ROLES, dtype=roles.dtype))
    if protected_token_ids is not None and protected_token_ids.numel() > 0:
        maskable &= ~torch.isin(input_ids, protected_token_ids.to(input_ids.device))
    return maskable


def draw_input_mask(
    maskable: torch.Tensor, mask_prob: float, *, seed: int, batch_index: int, sample_indices: Sequence[int],
) -> torch.Tensor:
    """Which maskable positions are replaced, each independently with ``mask_prob``."""
    if mask_prob <= 0:
        return torch.zeros_like(maskable)
    u = _per_sample_uniform(tuple(maskable.shape), seed, batch_index, sample_indices, _STREAM_INPUT_MASK)
    return maskable & (u < mask_prob)


def replacement_ids(
    input_ids: torch.Tensor,
    input_mask: torch.Tensor,
    *,
    strategy: str,
    mask_token_id: int | None = None,
    pad_token_id: int | None = None,
    random_candidates: torch.Tensor | None = None,
    seed: int = 0,
    batch_index: int = 0,
    sample_indices: Sequence[int] = (),
) -> torch.Tensor:
    """The masked input: ``input_ids`` with masked positions replaced according to ``strategy``.

    ``random`` draws uniformly from ``random_candidates`` (the vocabulary without special tokens).
    """
    if strategy == "mask_token":
        if mask_token_id is None:
            raise ValueError("mask_strategy='mask_token' needs a mask_token_id")
        fill = torch.full_like(input_ids, mask_token_id)
    elif strategy == "pad":
        if pad_token_id is None:
            raise ValueError("mask_strategy='pad' needs a pad_token_id")
        fill = torch.full_like(input_ids, pad_token_id)
    elif strategy == "random":
        if random_candidates is None or random_candidates.numel() == 0:
            raise ValueError("mask_strategy='random' needs a non-empty set of candidate token ids")
        u = _per_sample_uniform(tuple(input_ids.shape), seed, batch_index, sample_indices, _STREAM_REPLACEMENT)
        index = (u * random_candidates.numel()).long().clamp_(max=random_candidates.numel() - 1)
        fill = random_candidates.to(input_ids.device)[index].to(input_ids.dtype)
    else:
        raise ValueError(f"unknown mask_strategy {strategy!r}; choose one of {MASK_STRATEGIES}")
    return torch.where(input_mask, fill, input_ids)


@dataclass
class MaskedBatch:
    """What ReMask derives from one batch before the forward pass."""

    labels: torch.Tensor  # labels after the ReMask-CoT rules (used by both passes)
    masked_input_ids: torch.Tensor  # input of the second pass
    divergence_mask: torch.Tensor  # positions (unshifted) the divergence averages over
    input_mask: torch.Tensor  # positions replaced in the masked input
    maskable: torch.Tensor  # positions that could have been replaced


def remask_batch(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    token_roles: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    mask_prob: float,
    mask_strategy: str = "mask_token",
    mask_token_id: int | None = None,
    pad_token_id: int | None = None,
    random_candidates: torch.Tensor | None = None,
    protected_token_ids: torch.Tensor | None = None,
    rationale_label_drop_prob: float = 0.0,
    answer_only_prob: float = 0.0,
    seed: int = 0,
    batch_index: int = 0,
    sample_indices: Sequence[int] | None = None,
) -> MaskedBatch:
    """Apply the label rules and draw the input mask for a whole batch (CPU or device tensors).

    ``sample_indices`` are the rows' indices in the global batch (default ``0..B-1``). The
    divergence covers every position that was predicted before the label rules dropped any.
    """
    if input_ids.shape != labels.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and labels {tuple(labels.shape)} differ in shape")
    if sample_indices is None:
        sample_indices = range(input_ids.shape[0])
    sample_indices = list(sample_indices)
    if len(sample_indices) != input_ids.shape[0]:
        raise ValueError("sample_indices must have one entry per row")
    device = input_ids.device
    cpu = torch.device("cpu")
    input_ids_cpu, labels_cpu = input_ids.to(cpu), labels.to(cpu)
    roles = resolve_roles(labels_cpu, None if token_roles is None else token_roles.to(cpu),
                          None if attention_mask is None else attention_mask.to(cpu))
    new_labels = apply_label_rules(
        labels_cpu, roles, rationale_label_drop_prob=rationale_label_drop_prob,
        answer_only_prob=answer_only_prob, seed=seed, batch_index=batch_index, sample_indices=sample_indices)
    maskable = maskable_positions(roles, input_ids_cpu, protected_token_ids)
    input_mask = draw_input_mask(maskable, mask_prob, seed=seed, batch_index=batch_index,
                                 sample_indices=sample_indices)
    masked = input_ids_cpu.clone() if not bool(input_mask.any()) else replacement_ids(
        input_ids_cpu, input_mask, strategy=mask_strategy, mask_token_id=mask_token_id,
        pad_token_id=pad_token_id, random_candidates=random_candidates, seed=seed,
        batch_index=batch_index, sample_indices=sample_indices)
    return MaskedBatch(
        labels=new_labels.to(device),
        masked_input_ids=masked.to(device),
        divergence_mask=(labels_cpu != IGNORE_INDEX).to(device),
        input_mask=input_mask.to(device),
        maskable=maskable.to(device),
    )
