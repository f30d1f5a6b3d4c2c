"""Every private Composer and torch API this package relies on, in one place.

Written against the versions ``pyproject.toml`` pins (:data:`WRITTEN_AGAINST`, checked against it by
``tests/test_layers.py``). After upgrading either, re-read the code named below and run
``tests/remask/test_loss_weighting.py``, ``tests/remask/test_algorithm.py`` and
``tests/train/test_checkpoints.py``. Each reach, and what it relies on:

1. **Composer's microbatch weight** (:func:`composer_microbatch_weight`). Composer 0.32.1 has no
   public seam for it: ``Trainer._train_microbatch`` computes ``microbatch_size`` (the DataSpec's
   samples, or its ``loss_generating`` tokens under ``accumulate_train_batch_on_tokens``), receives
   ``current_batch_size`` (the same count for the rank's whole batch, averaged over ranks), and
   multiplies the loss by their ratio. The function reads those two locals off the call stack. Only
   ``ReMask(loss_weighting='auto')`` uses the weight, as the fallback for Trainers this project does not
   build; the project's recipes state the mode (``train/transforms.py``). A batch count of 0 (every
   label ignored, under token weighting) would make Composer divide by zero after the forward: ReMask
   reads it first (:func:`composer_microbatch_counts`) to refuse the batch by name.
2. **How Composer applies that weight** (:func:`loss_scaled_in_place`, :func:`weight_applied_in_place`):
   ``microbatch_loss.mul_(microbatch_size / current_batch_size)`` on ``state.loss['total']``
   itself, after ``Event.BEFORE_BACKWARD``; under a grad scaler (``amp_fp16``) it scales a copy.
   ReMask's ``WeightingProbe`` divides the value after backward by the value before.
3. **torch.distributed.checkpoint without a process group** (:func:`load_sharded_checkpoint`):
   torch 2.6 / 2.7 have no public call that reads every tensor of a sharded checkpoint without
   knowing its keys first; ``_load_state_dict(..., no_dist=True)`` with ``_EmptyStateDictLoadPlanner``
   does (torch's own ``dcp_to_torch_save`` uses the same pair).
"""

from __future__ import annotations

import inspect
import numbers
from typing import Any

import numpy as np
import torch

__all__ = ["WRITTEN_AGAINST", "composer_microbatch_counts", "composer_microbatch_weight", "load_sharded_checkpoint", "loss_scaled_in_place",
           "weight_applied_in_place"]

# The requirements of pyproject.toml this module was written against (kept equal by a test).
WRITTEN_AGAINST = ("mosaicml==0.32.1", "torch>=2.6,<2.7.1")

# The Trainer method that applies the microbatch weight, and the locals it computes it from.
_TRAINER_MICROBATCH_FRAME = "_train_microbatch"
_MICROBATCH_SIZE, _BATCH_SIZE = "microbatch_size", "current_batch_size"


def composer_microbatch_weight(max_depth: int = 32) -> float | None:
    """The weight the running Composer Trainer will multiply this microbatch's loss by, if found.

    Called from an algorithm while Composer trains a microbatch (``BEFORE_FORWARD`` ...
    ``BEFORE_BACKWARD``), when Composer has computed both counts from its own DataSpec and its own
    ``accumulate_train_batch_on_tokens`` setting. Returns ``None`` outside such a call.
    """
    counts = composer_microbatch_counts(max_depth + 1)
    return counts[0] / counts[1] if counts is not None and counts[1] > 0 else None


def composer_microbatch_counts(max_depth: int = 32) -> tuple[float, float] | None:
    """``(microbatch, batch)``: the two counts Composer divides to weight this microbatch, if found.

    A batch count of 0 (no loss-generating token under ``accumulate_train_batch_on_tokens``) is
    returned as it is: Composer will divide by it. ``None`` outside a Trainer's microbatch.
    """
    from composer import Trainer

    frame = inspect.currentframe()
    try:
        for _ in range(max_depth):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                return None
            if frame.f_code.co_name != _TRAINER_MICROBATCH_FRAME:
                continue
            scope = frame.f_locals
            if not isinstance(scope.get("self"), Trainer):
                continue
            size, total = _number(scope.get(_MICROBATCH_SIZE)), _number(scope.get(_BATCH_SIZE))
            return (size, total) if size is not None and total is not None else None
        return None
    finally:
        del frame


def _number(value: Any) -> float | None:
    """A count as Composer holds it: a Python or numpy number, or a one-element tensor (llm-foundry's)."""
    if isinstance(value, torch.Tensor):
        return float(value.item()) if value.numel() == 1 else None
    if isinstance(value, (numbers.Real, np.integer, np.floating)) and not isinstance(value, bool):
        return float(value)
    return None


def loss_scaled_in_place(precision: Any) -> bool:
    """Whether Composer multiplies ``state.loss['total']`` itself by the weight (not under ``amp_fp16``,
    where its grad scaler scales a copy)."""
    from composer.core.precision import Precision

    return precision != Precision.AMP_FP16


def weight_applied_in_place(total: torch.Tensor, value_before: float) -> float:
    """The factor Composer multiplied ``total`` by since it read ``value_before`` (non-zero)."""
    return float(total.detach()) / value_before


def load_sharded_checkpoint(storage_reader: Any) -> dict[str, Any]:
    """Every tensor and value of a sharded checkpoint, in this process alone (no process group)."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=storage_reader, planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    return state
