"""Pure functions that decide what ReMask hides and what it predicts.

Every random draw for a sample comes from a generator seeded by (seed, batch index, the sample's
key, stream), and draws one number per position from the start of the sequence. The key is a hash
of the sample's own tokens, not its place in the batch, so a sample gets the same masks whatever
the microbatch size, the number of ranks, how a sampler spreads samples over ranks (contiguous
blocks or interleaved) or the amount of right padding; and a resumed run draws exactly what the
uninterrupted run drew. Two identical samples in one batch get identical masks. Rows are taken as
right-padded (draws are indexed from the row's first position), and a packed row is one sample
(docs/design.md#determinism).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from composer_remask.batch import (
    IGNORE_INDEX,
    MASK_TOKEN,
    MASKABLE_ROLES,
    ROLE_CONTEXT,
    ROLE_PAD,
    ROLE_RATIONALE,
    ROLE_RESPONSE,
    tokenizer_pad_id,
)
from composer_remask.checks import finite_number

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


def sample_seed(seed: int, batch_index: int, sample_key: int, stream: int) -> int:
    """A 63-bit seed that depends only on its arguments (stable across processes and platforms)."""
    h = _splitmix64(seed & _MASK64)
    for value in (batch_index, sample_key, stream):
        h = _splitmix64(h ^ (value & _MASK64))
    return h & ((1 << 63) - 1)


def content_sample_keys(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, pad_token_id: int | None = None,
) -> list[int]:
    """One 64-bit key per row, from the row's own tokens (attended positions, or without trailing pad)."""
    ids = input_ids.detach().to("cpu", torch.int64)
    attended = None if attention_mask is None else attention_mask.detach().to("cpu").bool()
    keys = []
    for row in range(ids.shape[0]):
        tokens = ids[row]
        if attended is not None:
            tokens = tokens[attended[row]]
        elif pad_token_id is not None:
            keep = (tokens != pad_token_id).nonzero()
            tokens = tokens[: int(keep[-1]) + 1] if keep.numel() else tokens[:0]
        digest = hashlib.blake2b(tokens.numpy().tobytes(), digest_size=8).digest()
        keys.append(int.from_bytes(digest, "little"))
    return keys


def _generator(seed: int, batch_index: int, sample_key: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(sample_seed(seed, batch_index, sample_key, stream))


def _per_sample_uniform(
    shape: tuple[int, int], seed: int, batch_index: int, sample_keys: Sequence[int], stream: int,
) -> torch.Tensor:
    """Uniform [0, 1) draws, row i from the generator of the sample keyed ``sample_keys[i]``."""
    rows = [torch.rand(shape[1], generator=_generator(seed, batch_index, s, stream)) for s in sample_keys]
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
    sample_keys: Sequence[int],
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
        u = _per_sample_uniform(tuple(labels.shape), seed, batch_index, sample_keys, _STREAM_LABEL_DROP)
        drop |= u < rationale_label_drop_prob
    if answer_only_prob > 0:
        u = torch.stack([torch.rand(1, generator=_generator(seed, batch_index, s, _STREAM_ANSWER_ONLY))
                         for s in sample_keys])
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
    maskable: torch.Tensor, mask_prob: float, *, seed: int, batch_index: int, sample_keys: Sequence[int],
) -> torch.Tensor:
    """Which maskable positions are replaced, each independently with ``mask_prob``."""
    if mask_prob <= 0:
        return torch.zeros_like(maskable)
    u = _per_sample_uniform(tuple(maskable.shape), seed, batch_index, sample_keys, _STREAM_INPUT_MASK)
    return maskable & (u < mask_prob)


@dataclass(frozen=True)
class MaskVocabulary:
    """What the masked input may be made of: one value built from the model and its tokenizer.

    ``strategy`` is ``mask_token`` (``mask_token_id``), ``pad`` (``pad_token_id``) or ``random``
    (uniform over ``random_candidates``: the vocabulary without special tokens). Positions holding
    a ``protected_ids`` token (special tokens, structural tags, the mask itself) are never replaced.
    """

    strategy: str = "mask_token"
    mask_token_id: int | None = None
    pad_token_id: int | None = None
    protected_ids: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    random_candidates: torch.Tensor | None = None
    vocab_size: int | None = None  # rows of the model's embeddings: every label must be below it

    def __post_init__(self) -> None:  # the one check of a mask_strategy, wherever it enters
        if self.strategy not in MASK_STRATEGIES:
            raise ValueError(f"unknown mask_strategy {self.strategy!r}; choose one of {MASK_STRATEGIES}")

    @classmethod
    def from_model(cls, hf_model: Any, tokenizer: Any, strategy: str = "mask_token",
                   mask_token_id: int | None = None, replaces: bool = True) -> MaskVocabulary:
        """Resolve ids from the tokenizer and check them against the model's embeddings.

        ``replaces=False`` (no masked pass: plain SFT) needs no mask token, pad or candidates.
        """
        rows = embedding_rows(hf_model)
        special: set[int] = set()
        pad_id = None
        if tokenizer is not None:
            special = {int(i) for i in tokenizer.all_special_ids}
            pad_id = tokenizer_pad_id(tokenizer)
        if strategy == "mask_token" and replaces:
            mask_token_id = _resolve_mask_token(tokenizer, mask_token_id, rows)
        if mask_token_id is not None:
            special.add(int(mask_token_id))
        protected = torch.tensor(sorted(special), dtype=torch.long)
        candidates = None
        if strategy == "pad" and replaces and pad_id is None:
            raise ValueError("ReMask(mask_strategy='pad') needs a tokenizer with a pad or EOS token on the model "
                             "(HuggingFaceModel(tokenizer=...)).")
        if strategy == "random" and replaces:
            size = len(tokenizer) if tokenizer is not None else rows
            if size is None:
                raise ValueError("ReMask(mask_strategy='random') needs a tokenizer or a model config with vocab_size.")
            if rows is not None:
                size = min(size, rows)
            everything = torch.arange(size)
            candidates = everything[~torch.isin(everything, protected)]
        return cls(strategy, None if mask_token_id is None else int(mask_token_id), pad_id, protected, candidates,
                   rows)


def embedding_rows(hf_model: Any) -> int | None:
    """Rows of the model's input embeddings (its real vocabulary size), or the config's vocab_size."""
    if hf_model is not None and hasattr(hf_model, "get_input_embeddings"):
        emb = hf_model.get_input_embeddings()
        if emb is not None and hasattr(emb, "num_embeddings"):
            return int(emb.num_embeddings)
    config = getattr(hf_model, "config", None)
    return getattr(config, "vocab_size", None)


def _resolve_mask_token(tokenizer: Any, mask_id: int | None, vocab_rows: int | None) -> int:
    how = ("in Python add it with composer_remask.data.tokenizer.add_remask_tokens(tokenizer) and "
           "model.resize_token_embeddings(len(tokenizer)); in this project's recipes keep "
           "tokenizer: {add_remask_tokens: true}; in llm-foundry use tokenizer: {name: remask_tokenizer} with "
           "model: {allow_embedding_resizing: true}; or pass ReMask(mask_token_id=...), or choose "
           "mask_strategy='random' or 'pad'")
    if mask_id is None:
        if tokenizer is None:
            raise ValueError(f"ReMask cannot find {MASK_TOKEN}: the model has no tokenizer "
                             f"(HuggingFaceModel(tokenizer=...)); {how}.")
        if MASK_TOKEN not in tokenizer.get_vocab():
            raise ValueError(f"ReMask: the tokenizer has no {MASK_TOKEN} token; {how}.")
        mask_id = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
    if vocab_rows is not None and not 0 <= int(mask_id) < vocab_rows:
        raise ValueError(f"ReMask: mask token id {mask_id} is outside the model's {vocab_rows} embeddings; "
                         "resize the embeddings after adding the token (model.resize_token_embeddings).")
    return int(mask_id)


def replacement_ids(
    input_ids: torch.Tensor,
    input_mask: torch.Tensor,
    vocabulary: MaskVocabulary,
    *,
    seed: int = 0,
    batch_index: int = 0,
    sample_keys: Sequence[int] = (),
) -> torch.Tensor:
    """The masked input: ``input_ids`` with masked positions replaced as ``vocabulary`` says."""
    strategy = vocabulary.strategy
    if strategy == "mask_token":
        if vocabulary.mask_token_id is None:
            raise ValueError("mask_strategy='mask_token' needs a mask_token_id")
        fill = torch.full_like(input_ids, vocabulary.mask_token_id)
    elif strategy == "pad":
        if vocabulary.pad_token_id is None:
            raise ValueError("mask_strategy='pad' needs a pad_token_id")
        fill = torch.full_like(input_ids, vocabulary.pad_token_id)
    else:  # random
        candidates = vocabulary.random_candidates
        if candidates is None or candidates.numel() == 0:
            raise ValueError("mask_strategy='random' needs a non-empty set of candidate token ids")
        u = _per_sample_uniform(tuple(input_ids.shape), seed, batch_index, sample_keys, _STREAM_REPLACEMENT)
        index = (u * candidates.numel()).long().clamp_(max=candidates.numel() - 1)
        fill = candidates.to(input_ids.device)[index].to(input_ids.dtype)
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
    vocabulary: MaskVocabulary | None = None,
    rationale_label_drop_prob: float = 0.0,
    answer_only_prob: float = 0.0,
    seed: int = 0,
    batch_index: int = 0,
    sample_keys: Sequence[int] | None = None,
) -> MaskedBatch:
    """Apply the label rules and draw the input mask for a whole batch (CPU or device tensors).

    ``sample_keys`` identify the rows' samples (default: :func:`content_sample_keys`, a hash of
    each row's tokens). ``vocabulary`` says what masked positions become (default: nothing is
    protected and ``mask_prob`` must be 0). The divergence covers every position that was
    predicted before the label rules dropped any. The probabilities are checked here, where they
    enter; :func:`draw_batch_masks` is the same draw for callers that checked them already (ReMask).
    """
    return draw_batch_masks(
        input_ids, labels, token_roles, attention_mask, vocabulary=vocabulary, seed=seed, batch_index=batch_index,
        sample_keys=sample_keys, mask_prob=finite_number(mask_prob, "remask_batch: mask_prob", low=0.0, high=1.0),
        rationale_label_drop_prob=finite_number(rationale_label_drop_prob, "remask_batch: rationale_label_drop_prob",
                                                low=0.0, high=1.0),
        answer_only_prob=finite_number(answer_only_prob, "remask_batch: answer_only_prob", low=0.0, high=1.0))


def draw_batch_masks(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    token_roles: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    *,
    mask_prob: float,
    vocabulary: MaskVocabulary | None,
    rationale_label_drop_prob: float,
    answer_only_prob: float,
    seed: int,
    batch_index: int,
    sample_keys: Sequence[int] | None,
) -> MaskedBatch:
    """:func:`remask_batch` with probabilities already checked (in ``[0, 1]``, finite)."""
    if input_ids.shape != labels.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and labels {tuple(labels.shape)} differ in shape")
    vocabulary = vocabulary if vocabulary is not None else MaskVocabulary(strategy="mask_token")
    if sample_keys is None:
        sample_keys = content_sample_keys(input_ids, attention_mask, vocabulary.pad_token_id)
    sample_keys = list(sample_keys)
    if len(sample_keys) != input_ids.shape[0]:
        raise ValueError("sample_keys must have one entry per row")
    device = input_ids.device
    cpu = torch.device("cpu")
    input_ids_cpu, labels_cpu = input_ids.to(cpu), labels.to(cpu)
    roles = resolve_roles(labels_cpu, None if token_roles is None else token_roles.to(cpu),
                          None if attention_mask is None else attention_mask.to(cpu))
    new_labels = apply_label_rules(
        labels_cpu, roles, rationale_label_drop_prob=rationale_label_drop_prob,
        answer_only_prob=answer_only_prob, seed=seed, batch_index=batch_index, sample_keys=sample_keys)
    maskable = maskable_positions(roles, input_ids_cpu, vocabulary.protected_ids)
    input_mask = draw_input_mask(maskable, mask_prob, seed=seed, batch_index=batch_index, sample_keys=sample_keys)
    masked = input_ids_cpu.clone() if not bool(input_mask.any()) else replacement_ids(
        input_ids_cpu, input_mask, vocabulary, seed=seed, batch_index=batch_index, sample_keys=sample_keys)
    return MaskedBatch(
        labels=new_labels.to(device),
        masked_input_ids=masked.to(device),
        divergence_mask=(labels_cpu != IGNORE_INDEX).to(device),
        input_mask=input_mask.to(device),
        maskable=maskable.to(device),
    )
