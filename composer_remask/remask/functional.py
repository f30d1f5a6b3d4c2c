"""ReMask as functions: one batch's loss without a Trainer, and the step both entry points share.

:func:`remask_step_loss` does to one batch, in one process, what ``ReMask`` does inside a Composer
Trainer: the label rules and masks, one forward for both passes (the same layout ReMask chooses), and the loss with every term a
token mean over the batch. ``ReMask`` logs the same numbers for the same batch, seed and batch
index whatever its microbatch split (``tests/remask/test_functional.py``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch

from composer_remask.batch import DIVERGENCE_MASK_KEY, LAYOUT_FULL, LAYOUT_FULL_AND_MASKED, LAYOUT_MASKED_ONLY
from composer_remask.remask.hidden_states import LossRows, gather_loss_rows, output_logits
from composer_remask.remask.loss import predicted_positions, remask_loss_from_rows
from composer_remask.remask.loss_weighting import GlobalCounts, MicrobatchScales, microbatch_scales
from composer_remask.remask.masking import MaskVocabulary
from composer_remask.remask.options import RemaskOptions
from composer_remask.remask.prepared_batch import model_inputs, prepare_batch
from composer_remask.remask.shared_prefix import (
    FORWARD_LAYOUT_AUTO,
    FORWARD_LAYOUT_SHARED,
    attention_mask_dtype,
    choose_shared_prefix,
)

__all__ = ["microbatch_loss", "remask_step_loss"]


def microbatch_loss(rows: LossRows, targets: torch.Tensor, div_rows: torch.Tensor, scales: MicrobatchScales,
                    options: RemaskOptions, chunk_rows: int | None = None) -> dict[str, torch.Tensor]:
    """``state.loss`` for one microbatch: ``total`` and each term, scaled to the global token mean.

    With one pass, its CE is the full sequence's, or the masked one's under ``masked_only``.
    """
    total, sums = remask_loss_from_rows(
        rows.full, rows.masked, targets, div_rows, divergence_weight=options.divergence_weight,
        divergence=options.divergence, detach_full=options.detach_full, ce_scale=scales.ce,
        div_scale=scales.divergence, head_weight=rows.head_weight, head_bias=rows.head_bias,
        on_full_logits=rows.on_full_logits, chunk_rows=chunk_rows)
    single = "ce_masked" if options.layout == LAYOUT_MASKED_ONLY else "ce_full"
    loss = {"total": total, single: sums.ce_full * scales.ce}
    if options.layout == LAYOUT_FULL_AND_MASKED:
        loss["ce_masked"] = sums.ce_masked * scales.ce
        loss["divergence"] = sums.divergence * scales.divergence
    return loss


def remask_step_loss(model: torch.nn.Module, batch: Mapping[str, Any], *, tokenizer: Any = None, seed: int = 0,
                     batch_index: int = 0, forward_layout: str = FORWARD_LAYOUT_AUTO,
                     **arguments: Any) -> dict[str, torch.Tensor]:
    """ReMask's loss on one batch of a Hugging Face causal LM: what ``ReMask`` trains on, as a function.

    ``batch`` holds ``input_ids``, ``attention_mask`` and unshifted ``labels`` (-100 where nothing
    is predicted), and optionally ``token_roles``; ``tokenizer`` finds ``<|mask|>`` and the special
    tokens that are never masked. ``arguments`` are ``ReMask``'s, with its defaults: ``mask_prob``,
    ``weight``, ``divergence``, ``mask_strategy``, ``mask_token_id``, ``rationale_label_drop_prob``,
    ``answer_only_prob``, ``detach_full``, ``masked_only``. ``seed`` and ``batch_index`` select the
    masks (``ReMask`` uses its seed and ``state.timestamp.batch``); ``forward_layout`` is ``ReMask``'s
    (``auto``: shared prefixes where the model takes them). Returns ``{total, ce_full,
    ce_masked, divergence}`` (one pass: ``total`` and its CE), with ``total = 0.5 * (ce_full +
    ce_masked) + weight * divergence``; call ``["total"].backward()``.
    """
    options = RemaskOptions.from_arguments(**arguments)
    vocabulary = MaskVocabulary.from_model(model, tokenizer, options.mask_strategy, options.mask_token_id,
                                           replaces=options.layout != LAYOUT_FULL)
    drop, answer_only = options.label_rule_probs
    prepared, local_counts = prepare_batch(
        batch, vocabulary, mask_prob=options.mask_prob, layout=options.layout, seed=seed, batch_index=batch_index,
        rationale_label_drop_prob=drop, answer_only_prob=answer_only)
    two_pass = options.layout == LAYOUT_FULL_AND_MASKED
    share_prefix = two_pass and choose_shared_prefix(forward_layout, model)[0]
    inputs, shared_rows, _ = model_inputs(prepared, options.layout, share_prefix, attention_mask_dtype(model),
                                          forced=forward_layout == FORWARD_LAYOUT_SHARED,
                                          model_takes=frozenset(inspect.signature(model.forward).parameters))
    logits = output_logits(model(**inputs))
    labels = prepared["labels"]
    batch_idx, pos_idx, targets, div_rows = predicted_positions(
        labels, prepared[DIVERGENCE_MASK_KEY] if two_pass else None)
    rows = gather_loss_rows(logits, None, labels.shape[0], labels.shape[1], batch_idx, pos_idx, two_pass,
                            want_metric_logits=False,
                            shared_index=None if shared_rows is None else (shared_rows.full_index,
                                                                           shared_rows.masked_index))
    scales = microbatch_scales(GlobalCounts(*local_counts.tolist()), composer_weight=1.0, world_size=1)
    return microbatch_loss(rows, targets, div_rows, scales, options)
