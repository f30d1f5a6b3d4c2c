"""Temporary alias of ``composer_remask.loss`` with the old ``remask_loss_from_rows`` signature.

Kept only until ``algorithm.py`` calls ``composer_remask.loss`` directly; new code imports from there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from composer_remask.loss import (  # noqa: F401  (re-exported)
    DIVERGENCE_SPECS,
    DIVERGENCES,
    LossSums,
    predicted_positions,
    remask_loss,
    token_divergence,
)
from composer_remask.loss import remask_loss_from_rows as _remask_loss_from_rows


def remask_loss_from_rows(
    rows_full: torch.Tensor,
    rows_masked: torch.Tensor | None,
    targets: torch.Tensor,
    div_rows: torch.Tensor,
    *,
    weight: float,
    divergence: str,
    detach_full: bool,
    ce_scale: float,
    div_scale: float,
    output_weight: torch.Tensor | None = None,
    output_bias: torch.Tensor | None = None,
    on_full_logits: Callable[[int, int, torch.Tensor], None] | None = None,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The old call: ``weight`` is the divergence weight; returns ``(total, tensor([ce_full, ce_masked, div]))``."""
    total, sums = _remask_loss_from_rows(
        rows_full, rows_masked, targets, div_rows, divergence_weight=weight, divergence=divergence,
        detach_full=detach_full, ce_scale=ce_scale, div_scale=div_scale, head_weight=output_weight,
        head_bias=output_bias, on_full_logits=on_full_logits, chunk_rows=chunk_rows)
    return total, torch.stack(tuple(sums))
