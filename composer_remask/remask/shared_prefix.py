"""The shared-prefix forward: the masked pass without recomputing what masking cannot change.

In a masked row every position before the row's first masked token sees exactly the inputs of the
full row (causal attention), so its hidden state *is* the full row's. The shared-prefix layout
therefore runs each row once, as one segment, in one forward::

    [ full row (its tokens, up to its last real one) | masked suffix (from the first masked token) ]

with explicit ``position_ids`` (the suffix continues at the first masked position) and a custom 4D
attention mask: full positions attend causally to the full row; suffix positions attend to the full
row's unmasked prefix and causally to the suffix. A row without a masked token adds nothing.
Segments are packed into the forward's rows (several short ones to a row, never attending to each
other), so neither the prefix nor the padding is computed twice. The loss reads the masked row's
prefix outputs from the full part (``masked_index``), so its terms there are bitwise the full
row's: divergence 0, masked CE = full CE, as in ``[full; masked]``.

Where a model or batch cannot take it (no arbitrary-mask attention, sliding windows, position ids or
packed ``sequence_id`` already in the batch, ...) the stacked ``[full; masked]`` layout runs.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from composer_remask.batch import MASKED_INPUT_IDS_KEY

__all__ = ["FORWARD_LAYOUTS", "choose_shared_prefix", "SHARED_PREFIX_MODEL_TYPES", "SharedPrefixRows", "attention_mask_dtype",
           "batch_problem", "model_problem", "shared_prefix_inputs", "shared_prefix_passes"]

# ReMask(forward_layout=...): chosen automatically, or forced.
FORWARD_LAYOUT_AUTO = "auto"
FORWARD_LAYOUT_SHARED = "shared_prefix"
FORWARD_LAYOUT_STACKED = "stacked"
FORWARD_LAYOUTS = (FORWARD_LAYOUT_AUTO, FORWARD_LAYOUT_SHARED, FORWARD_LAYOUT_STACKED)

# Hugging Face model types whose attention takes a custom 4D additive mask and explicit position ids
# as given (transformers 4.51-4.53), each checked against the stacked layout by the test suite.
SHARED_PREFIX_MODEL_TYPES = ("gpt_neox", "llama", "mistral", "qwen2", "stablelm")
_MASK_ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")
# Config attributes of dropout in these families (attention, residual, hidden, embedding).
_DROPOUT_ATTRIBUTES = ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                       "classifier_dropout_prob", "mlp_dropout")
# The only per-row forward inputs the layout knows how to lay out.
_LAID_OUT_KEYS = ("input_ids", "attention_mask")


def model_problem(hf_model: Any) -> str | None:
    """Why ``hf_model`` cannot run the shared-prefix layout exactly, or ``None`` when it can."""
    config = getattr(hf_model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SHARED_PREFIX_MODEL_TYPES:
        return (f"model type {model_type!r} is not one whose custom 4D attention masks are known to be honoured "
                f"({', '.join(SHARED_PREFIX_MODEL_TYPES)})")
    attention = getattr(config, "_attn_implementation", None)
    if attention not in _MASK_ATTENTION_IMPLEMENTATIONS:
        return f"attn_implementation {attention!r} takes no arbitrary attention mask (eager or sdpa do)"
    window = getattr(config, "sliding_window", None)
    if window is not None and (model_type != "qwen2" or getattr(config, "use_sliding_window", False)):
        return f"sliding-window attention (sliding_window={window}) is not expressed by a custom mask"
    if "position_ids" not in inspect.signature(hf_model.forward).parameters:
        return "the model's forward takes no position_ids"
    dropout = {name: getattr(config, name) for name in _DROPOUT_ATTRIBUTES
               if isinstance(getattr(config, name, None), (int, float)) and getattr(config, name) > 0}
    if dropout:
        return (f"dropout ({', '.join(f'{k}={v}' for k, v in dropout.items())}) draws other noise for the masked "
                "row's prefix than for the full row's, so that prefix is not the full row's")
    return None


def choose_shared_prefix(forward_layout: str, hf_model: Any) -> tuple[bool, str | None]:
    """``(shares_prefix, why_not)`` for a two-pass run of ``hf_model`` under ``ReMask(forward_layout=...)``.

    ``shared_prefix`` on a model that cannot take it is an error; ``auto`` falls back to stacked.
    """
    if forward_layout not in FORWARD_LAYOUTS:
        raise ValueError(f"ReMask: unknown forward_layout {forward_layout!r}; choose one of {FORWARD_LAYOUTS}")
    if forward_layout == FORWARD_LAYOUT_STACKED:
        return False, "forward_layout='stacked'"
    problem = ("no Hugging Face model in a Composer HuggingFaceModel (which names the arguments that reach its "
               "forward)") if hf_model is None else model_problem(hf_model)
    if problem is not None and forward_layout == FORWARD_LAYOUT_SHARED:
        raise ValueError(f"ReMask(forward_layout='shared_prefix') cannot run exactly here: {problem}. Use "
                         "forward_layout='auto' (falls back to the stacked [full; masked] layout) or 'stacked'.")
    return problem is None, problem


def batch_problem(inputs: Mapping[str, Any], rows: int) -> str | None:
    """Why a microbatch's forward inputs cannot be laid out with shared prefixes, or ``None``."""
    others = sorted(key for key, value in inputs.items() if key not in _LAID_OUT_KEYS
                    and isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows)
    if others:
        return f"the batch carries per-row inputs the layout does not rebuild ({', '.join(others)})"
    mask = inputs.get("attention_mask")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != inputs["input_ids"].shape):
        return "the attention mask is not a (batch, sequence) padding mask"
    return None


@dataclass(frozen=True)
class SharedPrefixRows:
    """Where each row's outputs sit in the shared-prefix forward (flat indices into its rows x length)."""

    full_index: torch.Tensor  # (B, T): the full row's output at each position
    masked_index: torch.Tensor  # (B, T): the masked row's (its prefix is the full row's own outputs)
    seq_len: int  # length of the forward's rows
    rows: int  # the forward's rows (segments packed several to a row where they fit)
    suffix_tokens: int  # positions the masked suffixes add (what the masked pass still costs)


def _attended(full_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The padding mask as booleans on the ids' device (every position without one)."""
    if attention_mask is None:
        return torch.ones_like(full_ids, dtype=torch.bool)
    return attention_mask.to(full_ids.device).bool()


def _segment_extents(full_ids: torch.Tensor, masked_ids: torch.Tensor, attended: torch.Tensor,
                     predicted: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: one past its last attended (or predicted) position, and its first masked position
    (``end`` for a row without one): the full part is ``[0, end)``, the suffix ``[first, end)``."""
    length = full_ids.shape[-1]

    def end_of(marks: torch.Tensor) -> torch.Tensor:  # one past the last marked position (0 without any)
        return torch.where(marks.any(-1), length - marks.flip(-1).int().argmax(-1), 0)

    end = end_of(attended) if predicted is None else torch.maximum(end_of(attended), end_of(predicted))
    differs = (masked_ids != full_ids) & (torch.arange(length, device=full_ids.device) < end[:, None])
    return end, torch.where(differs.any(-1), differs.int().argmax(-1), end)


def _pack(lengths: list[int]) -> tuple[int, list[tuple[int, int]]]:
    """First-fit decreasing: ``(capacity, [(row, offset) per segment])`` with the capacity the longest
    segment, so no forward row is longer than it must be and short segments share rows."""
    capacity = max(max(lengths, default=1), 1)
    free: list[int] = []
    placed: list[tuple[int, int]] = [(0, 0)] * len(lengths)
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        size = lengths[index]
        row = next((r for r, room in enumerate(free) if room >= size), None)
        if row is None:
            row = len(free)
            free.append(capacity)
        placed[index] = (row, capacity - free[row])
        free[row] -= size
    return capacity, placed


def shared_prefix_inputs(inputs: Mapping[str, Any], masked_ids: torch.Tensor, predicted: torch.Tensor,
                         mask_dtype: torch.dtype) -> tuple[dict[str, Any], SharedPrefixRows]:
    """The model's input for the shared-prefix layout, and where the rows' outputs are.

    ``inputs`` are the full rows' forward inputs (``input_ids``, optionally a 2D ``attention_mask``);
    ``predicted`` (B x T, bool) marks the positions whose output the loss reads. Each row becomes one
    segment, ``[full row up to its last real or predicted position | masked suffix]``, and segments
    are packed into the forward's rows (first-fit decreasing) with a block-diagonal attention mask and
    positions restarting at each segment, so padding is not computed either.
    """
    full_ids = inputs["input_ids"]
    rows, length = full_ids.shape
    device = full_ids.device
    masked_ids = masked_ids.to(device)
    attended = _attended(full_ids, inputs.get("attention_mask"))
    positions = torch.arange(length, device=device)
    end, first_masked = _segment_extents(full_ids, masked_ids, attended, predicted.to(device))
    suffix = end - first_masked
    seq_len, placed = _pack((end + suffix).tolist())
    forward_rows = 1 + max(row for row, _ in placed) if placed else 1

    # Which segment (input row) and which of its positions each forward position holds.
    segment = torch.full((forward_rows, seq_len), -1, dtype=torch.long, device=device)
    local = torch.zeros((forward_rows, seq_len), dtype=torch.long, device=device)
    start = torch.tensor([row * seq_len + offset for row, offset in placed], dtype=torch.long, device=device)
    for b, (row, offset) in enumerate(placed):
        size = int(end[b] + suffix[b])
        segment[row, offset:offset + size] = b
        local[row, offset:offset + size] = torch.arange(size, device=device)
    real = segment >= 0
    owner = segment.clamp(min=0)
    owner_end, owner_first = end[owner], first_masked[owner]
    in_full = real & (local < owner_end)
    in_suffix = real & ~in_full
    source = torch.where(in_full, local, owner_first + local - owner_end)
    source = torch.where(real, source, 0).clamp(0, length - 1)
    ids = torch.where(in_suffix, masked_ids[owner, source], full_ids[owner, source])
    key_ok = real & attended[owner, source]
    same_segment = segment[:, :, None] == segment[:, None, :]
    causal = torch.arange(seq_len, device=device)
    causal = causal[:, None] >= causal[None, :]
    # A suffix position must not see its full row from the first masked position on: that is the
    # unmasked text the masked row replaced.
    unseen = in_suffix[:, :, None] & in_full[:, None, :] & (source[:, None, :] >= owner_first[:, :, None])
    allowed = same_segment & causal & key_ok[:, None, :] & ~unseen
    # A query that may see nothing (padding before any real token; nothing reads it) sees itself, so
    # no softmax row is empty; every other query sees exactly what it sees in the stacked layout.
    allowed |= torch.eye(seq_len, dtype=torch.bool, device=device) & ~allowed.any(-1, keepdim=True)
    mask = torch.zeros((forward_rows, 1, seq_len, seq_len), dtype=mask_dtype, device=device)
    mask.masked_fill_(~allowed[:, None], torch.finfo(mask_dtype).min)

    laid_out = dict(inputs)
    laid_out["input_ids"] = ids
    laid_out["attention_mask"] = mask
    laid_out["position_ids"] = torch.where(real, source, 0)
    last = forward_rows * seq_len - 1
    full_index = (start[:, None] + positions).clamp(max=last)
    masked_index = (start[:, None] + torch.where(positions < first_masked[:, None], positions,
                                                 end[:, None] + positions - first_masked[:, None])).clamp(max=last)
    return laid_out, SharedPrefixRows(full_index, masked_index, seq_len, forward_rows, int(suffix.sum()))


def attention_mask_dtype(hf_model: Any) -> torch.dtype:
    """The dtype Hugging Face itself builds additive masks in: that of the input embeddings."""
    embeddings = getattr(hf_model, "get_input_embeddings", lambda: None)()
    weight = getattr(embeddings, "weight", None)
    dtype = getattr(weight, "dtype", torch.float32)
    return dtype if dtype.is_floating_point else torch.float32


def shared_prefix_passes(batch: Any) -> float:
    """Forward+backward passes a prepared batch costs in the shared-prefix layout, for FLOP counting:
    the full rows, plus each masked row's suffix from its first masked token (as a share of the rows'
    positions). A batch without a masked input runs one pass. An estimate in the padded ``B*T``
    convention of the model's count: a suffix token is charged a full row's per-token cost, though its
    attention spans the shared prefix too."""
    masked = batch.get(MASKED_INPUT_IDS_KEY) if hasattr(batch, "get") else None
    if masked is None:
        return 1.0
    full_ids = batch["input_ids"]
    attended = _attended(full_ids, batch.get("attention_mask"))
    end, first = _segment_extents(full_ids, masked.to(full_ids.device), attended)
    return 1.0 + float((end - first).clamp(min=0).sum()) / max(1, full_ids.numel())
