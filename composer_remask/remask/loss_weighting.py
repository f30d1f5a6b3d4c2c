"""Exact token means across microbatches and ranks, whatever Composer's microbatch weighting.

See docs/design.md#normalization.

Composer multiplies each microbatch's loss by a weight ``c = u(microbatch) / mean over ranks of
u(rank's batch)``, where ``u`` counts samples (the default) or loss-generating tokens
(``accumulate_train_batch_on_tokens=True``, counted by the DataSpec), and DDP then averages the
ranks' gradients. ReMask's loss is a token mean over the whole global batch, so each microbatch
hands Composer its token sums scaled by ``world_size / (c * global tokens)``: Composer's weight
and DDP's average then cancel and every token counts ``1 / global tokens``, exactly.

``c`` comes from a declared mode (``samples``, or ``tokens`` counted by ``batch_loss_tokens``:
:func:`declared_microbatch_weight`; the project's recipes declare it), or, with ``auto``, is read
from the running Trainer (``composer_remask._private_api.composer_microbatch_weight``).
:class:`WeightingProbe` checks it against what the Trainer really applied on the first microbatch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from composer_remask._private_api import weight_applied_in_place

LOSS_WEIGHTINGS = ("auto", "samples", "tokens")


@dataclass(frozen=True)
class GlobalCounts:
    """Counts of one global batch (all ranks), taken once the batch is final."""

    samples: float  # rows
    ce_tokens: float  # positions with a label (after the ReMask-CoT label rules)
    divergence_tokens: float  # positions the divergence averages over (what batch_loss_tokens counts)
    masked: float  # input positions replaced in the masked pass
    maskable: float  # input positions that could have been replaced

    @classmethod
    def gather(cls, local: torch.Tensor, device: Any = None) -> GlobalCounts:
        """Sum ``[samples, ce_tokens, divergence_tokens, masked, maskable]`` (float64) over the ranks."""
        from composer.utils import dist

        if dist.get_world_size() > 1:
            reduced = local.clone() if device is None else device.tensor_to_device(local.clone())
            dist.all_reduce(reduced, reduce_operation="SUM")
            local = reduced.cpu()
        return cls(*(float(x) for x in local[:5]))


def declared_microbatch_weight(loss_weighting: str, microbatch: Mapping[str, Any], counts: GlobalCounts,
                               world_size: int) -> float:
    """Composer's weight under a declared mode (``samples`` or ``tokens`` counted by batch_loss_tokens)."""
    from composer_remask.batch import batch_loss_tokens

    if loss_weighting == "samples":
        mine, total = float(microbatch["input_ids"].shape[0]), counts.samples
    elif loss_weighting == "tokens":
        mine, total = float(batch_loss_tokens(microbatch)), counts.divergence_tokens
    else:
        raise ValueError(f"no declared microbatch weight for loss_weighting={loss_weighting!r}")
    return mine / (total / world_size) if total > 0 else 0.0


@dataclass(frozen=True)
class MicrobatchScales:
    """Multipliers of this microbatch's token sums (CE and divergence) in the loss handed to Composer."""

    ce: float
    divergence: float
    composer_weight: float


def microbatch_scales(counts: GlobalCounts, composer_weight: float, world_size: int) -> MicrobatchScales:
    """Scales so that ``composer_weight * sums * scale``, averaged over ranks, is the global token mean."""
    factor = world_size / composer_weight if composer_weight > 0 else 0.0
    return MicrobatchScales(
        ce=factor / counts.ce_tokens if counts.ce_tokens > 0 else 0.0,
        divergence=factor / counts.divergence_tokens if counts.divergence_tokens > 0 else 0.0,
        composer_weight=composer_weight,
    )


class WeightingProbe:
    """Checks, once, that Composer applied the microbatch weight the normalization assumed.

    Composer scales the loss in place by its weight before backward, so the value after backward
    divided by the value before is the weight it really used (``_private_api.weight_applied_in_place``).
    Where Composer scales a copy instead (``scaled_copy``: its grad scaler under ``amp_fp16``),
    nothing can be measured and the probe stays off.
    """

    def __init__(self) -> None:
        self.confirmed = False
        self._armed: tuple[torch.Tensor, float, float] | None = None

    @property
    def armed(self) -> bool:
        return self._armed is not None

    def arm(self, total: torch.Tensor, expected_weight: float, scaled_copy: bool = False) -> None:
        if not self.confirmed and not scaled_copy and expected_weight > 0:
            self._armed = (total, float(total.detach()), expected_weight)

    def applied_weight(self) -> tuple[float, float] | None:
        """``(applied, expected)`` for the armed microbatch, or ``None`` when it tells nothing."""
        if self._armed is None:
            return None
        total, before, expected = self._armed
        self._armed = None
        if before == 0.0:
            return None
        applied = weight_applied_in_place(total, before)
        self.confirmed = True
        return applied, expected

    @staticmethod
    def matches(applied: float, expected: float) -> bool:
        return abs(applied - expected) <= 1e-4 * max(1.0, abs(expected))
