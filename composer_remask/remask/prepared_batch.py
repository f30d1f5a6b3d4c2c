"""What ReMask adds to a device batch before training on it, and the checks that it still holds.

A prepared batch carries, next to the user's keys: the labels after the ReMask-CoT rules, the
positions the divergence covers, the masked input, and a fingerprint (each row's content key and
token counts). Composer splits all of them into microbatches along with the batch, so any
microbatch split works; the fingerprint lets each microbatch be checked before it is trained.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import torch

from composer_remask.batch import (
    DIVERGENCE_MASK_KEY,
    IGNORE_INDEX,
    LAYOUT_FULL,
    LAYOUT_FULL_AND_MASKED,
    LAYOUT_MASKED_ONLY,
    LAYOUTS,
    MASKED_INPUT_IDS_KEY,
    MASKED_ONLY_INPUT_IDS_KEY,
    PREPARED_KEYS,
    ROW_COUNTS_KEY,
    SAMPLE_KEYS_KEY,
    TOKEN_ROLES_KEY,
    forward_passes,
    num_loss_tokens,
    row_counts,
)
from composer_remask.remask.masking import MaskVocabulary, content_sample_keys, draw_batch_masks
from composer_remask.remask.shared_prefix import (
    SharedPrefixRows,
    batch_problem,
    shared_prefix_inputs,
    shared_prefix_passes,
)

_SIGN = 1 << 63


def _to_int64(keys: list[int]) -> torch.Tensor:
    return torch.tensor([k - (1 << 64) if k >= _SIGN else k for k in keys], dtype=torch.int64)


def _masked_key(layout: str) -> str | None:
    """The batch key holding the masked input ``layout`` runs, if any."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    return {LAYOUT_FULL: None, LAYOUT_FULL_AND_MASKED: MASKED_INPUT_IDS_KEY,
            LAYOUT_MASKED_ONLY: MASKED_ONLY_INPUT_IDS_KEY}[layout]


def check_batch(batch: Any, vocab_size: int | None = None) -> None:
    """The batch contract ReMask trains on, checked once per batch (the lean and the logits path
    alike): dict batches with ``input_ids`` and integer ``labels`` of the same shape, each label
    -100 or a token id below ``vocab_size``. Anything else would be trained as something it is not
    (cross-entropy reads -1 as a token id) or fail deep in the loss."""
    if not isinstance(batch, Mapping) or "input_ids" not in batch or "labels" not in batch:
        keys = list(batch.keys()) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(f"ReMask needs dict batches with 'input_ids' and 'labels' (unshifted, -100 where "
                         f"nothing is predicted); got {keys}.")
    labels, ids = batch["labels"], batch["input_ids"]
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype.is_complex \
            or labels.dtype == torch.bool:
        what = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"ReMask: batch['labels'] must be an integer tensor of token ids (torch.long), got {what}.")
    if not isinstance(ids, torch.Tensor) or ids.shape != labels.shape:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"ReMask: batch['labels'] {tuple(labels.shape)} must have the shape of batch['input_ids'] "
                         f"{shape} (unshifted labels, aligned with the inputs).")
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size if vocab_size is not None else False))
    if bool(bad.any()):
        row, position = (int(i) for i in bad.nonzero()[0])
        value = int(labels[row, position])
        why = (f"use {IGNORE_INDEX} where nothing is predicted (a label of {value} would be trained as a token)"
               if value < 0 else f"the model's vocabulary has {vocab_size} tokens")
        raise ValueError(f"ReMask: batch['labels'] holds {value} at row {row}, position {position} "
                         f"({int(bad.sum())} such labels in the batch): {why}. Fix the collator.")


def prepare_batch(
    batch: Mapping[str, Any], vocabulary: MaskVocabulary, *, mask_prob: float, layout: str, seed: int,
    batch_index: int, rationale_label_drop_prob: float, answer_only_prob: float,
) -> tuple[dict[str, Any], torch.Tensor]:
    """The prepared batch, and this rank's counts ``[rows, CE tokens, divergence tokens, masked, maskable]``.

    ``layout`` (``composer_remask.batch.LAYOUTS``) says which passes will run; masks are drawn only
    for a layout with a masked pass.
    """
    check_batch(batch, vocabulary.vocab_size)
    masked_key = _masked_key(layout)
    keys = content_sample_keys(batch["input_ids"], batch.get("attention_mask"), vocabulary.pad_token_id)
    masked = draw_batch_masks(
        batch["input_ids"], batch["labels"], batch.get(TOKEN_ROLES_KEY), batch.get("attention_mask"),
        mask_prob=mask_prob if masked_key else 0.0, vocabulary=vocabulary, seed=seed, batch_index=batch_index,
        rationale_label_drop_prob=rationale_label_drop_prob, answer_only_prob=answer_only_prob, sample_keys=keys)
    prepared = dict(batch)
    prepared["labels"] = masked.labels
    prepared[DIVERGENCE_MASK_KEY] = masked.divergence_mask
    prepared[SAMPLE_KEYS_KEY] = _to_int64(keys).to(masked.labels.device)
    prepared[ROW_COUNTS_KEY] = row_counts(masked.labels, masked.divergence_mask)
    if masked_key:
        prepared[masked_key] = masked.masked_input_ids
    counts = torch.tensor([masked.labels.shape[0], num_loss_tokens(masked.labels),
                           int(masked.divergence_mask[:, 1:].sum()), int(masked.input_mask.sum()),
                           int(masked.maskable.sum())], dtype=torch.float64)
    return prepared, counts


def microbatch_problem(microbatch: Any, vocabulary: MaskVocabulary, layout: str) -> str | None:
    """Why this microbatch is not rows of a batch prepared for ``layout``, unchanged; ``None`` when it is."""
    masked_key = _masked_key(layout)
    shaped = ("labels", DIVERGENCE_MASK_KEY) + ((masked_key,) if masked_key else ())
    required = (*shaped, SAMPLE_KEYS_KEY, ROW_COUNTS_KEY)
    if not isinstance(microbatch, Mapping) or any(k not in microbatch for k in required):
        return "ReMask's keys are missing"
    ids = microbatch["input_ids"]
    shapes = [microbatch[k].shape for k in shaped]
    if any(shape != ids.shape for shape in shapes) or microbatch[SAMPLE_KEYS_KEY].shape[0] != ids.shape[0]:
        return "its shape changed"
    keys = _to_int64(content_sample_keys(ids, microbatch.get("attention_mask"), vocabulary.pad_token_id))
    if not torch.equal(keys, microbatch[SAMPLE_KEYS_KEY].cpu()):
        return "its tokens or attention mask changed"
    if not torch.equal(row_counts(microbatch["labels"], microbatch[DIVERGENCE_MASK_KEY]).cpu(),
                       microbatch[ROW_COUNTS_KEY].cpu()):
        return "its labels changed"
    return None


def forward_batch(microbatch: Mapping[str, Any], layout: str) -> dict[str, Any]:
    """The model's input for ``layout``: ``[full; masked]`` along the batch, the full rows only, or
    the masked rows only (the same attention mask and other keys: masking replaces tokens in place).

    Labels, token roles and ReMask's keys stay out: the loss is computed from the outputs.
    """
    masked_key = _masked_key(layout)
    rows = int(microbatch["input_ids"].shape[0])
    inputs: dict[str, Any] = {}
    for key, value in microbatch.items():
        if key in PREPARED_KEYS or key in ("labels", TOKEN_ROLES_KEY):
            continue
        if layout == LAYOUT_MASKED_ONLY and key == "input_ids":
            value = microbatch[masked_key].to(value.device)
        elif layout == LAYOUT_FULL_AND_MASKED and isinstance(value, torch.Tensor) and value.dim() > 0 \
                and value.shape[0] == rows:
            second = microbatch[masked_key] if key == "input_ids" else value
            value = torch.cat([value, second.to(value.device)], dim=0)
        inputs[key] = value
    return inputs


def predicted_inputs(microbatch: Mapping[str, Any]) -> torch.Tensor:
    """(B x T, bool) positions whose output the loss reads: they predict a label or the divergence's next token."""
    labels = microbatch["labels"]
    predicted = torch.zeros_like(labels, dtype=torch.bool)
    predicted[:, :-1] = (labels[:, 1:] != IGNORE_INDEX) | microbatch[DIVERGENCE_MASK_KEY][:, 1:].bool()
    return predicted


def _shareable_full_inputs(batch: Mapping[str, Any], model_takes: Collection[str] | None,
                           ) -> tuple[dict[str, Any], str | None]:
    """The full rows' model input (keys the model does not take left out), and why it cannot share prefixes."""
    full = {key: value for key, value in forward_batch(batch, LAYOUT_FULL).items()
            if model_takes is None or key in model_takes}
    return full, batch_problem(full, int(batch["input_ids"].shape[0]))


def passes_run(batch: Any, share_prefix: bool, model_takes: Collection[str] | None = None) -> float:
    """Forward+backward passes (in full-batch units) the layout :func:`model_inputs` gives ``batch`` costs,
    for FLOP counting: the full rows plus the masked suffixes where prefixes are shared, two whole passes
    where the batch runs stacked (also under ``auto``, for a batch that cannot share), one without a mask."""
    if share_prefix and hasattr(batch, "get") and batch.get(MASKED_INPUT_IDS_KEY) is not None \
            and _shareable_full_inputs(batch, model_takes)[1] is None:
        return shared_prefix_passes(batch)
    return float(forward_passes(batch))


def model_inputs(microbatch: Mapping[str, Any], layout: str, share_prefix: bool, mask_dtype: torch.dtype,
                 forced: bool = False, model_takes: Collection[str] | None = None,
                 ) -> tuple[dict[str, Any], SharedPrefixRows | None, str | None]:
    """The model's input for ``layout``: ``(inputs, shared_rows, why_stacked)``.

    With ``share_prefix`` a two-pass microbatch runs ``[full | masked suffix]`` per row
    (:mod:`composer_remask.remask.shared_prefix`; ``shared_rows`` says where the masked outputs are);
    one that cannot be laid out so runs stacked, ``why_stacked`` saying why (an error when ``forced``).
    ``model_takes`` names the model's forward arguments: other keys never reach the model (Composer's
    ``HuggingFaceModel`` drops them, e.g. llm-foundry's ``sequence_id`` for Hugging Face models), so
    they are left out of the shared-prefix input rather than stopping it.
    """
    if share_prefix and layout == LAYOUT_FULL_AND_MASKED:
        full, problem = _shareable_full_inputs(microbatch, model_takes)
        if problem is None:
            inputs, rows = shared_prefix_inputs(full, microbatch[MASKED_INPUT_IDS_KEY], predicted_inputs(microbatch),
                                                mask_dtype)
            return inputs, rows, None
        if forced:
            raise ValueError(f"ReMask(forward_layout='shared_prefix') cannot run this batch exactly: {problem}. "
                             "Use forward_layout='auto' or 'stacked'.")
        return forward_batch(microbatch, layout), None, problem
    return forward_batch(microbatch, layout), None, None
