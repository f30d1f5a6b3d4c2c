"""Facts read off a running Composer Trainer, defined once: the run length, the model under DDP."""

from __future__ import annotations

import torch
from composer.core import State, TimeUnit

__all__ = ["run_length_in_batches", "unwrap_ddp"]


def run_length_in_batches(state: State) -> int | None:
    """Batches the run will train: ``max_duration`` in batches, or epochs times batches per epoch.

    ``None`` when that cannot be known: no ``max_duration``, epochs without a dataloader length,
    or a duration in samples, tokens or time. Epoch durations advance once per epoch, so readers
    that need a smooth fraction of the run count batches against this.
    """
    max_duration = state.max_duration
    if max_duration is None:
        return None
    if max_duration.unit == TimeUnit.BATCH:
        return int(max_duration.value)
    if max_duration.unit == TimeUnit.EPOCH and state.dataloader_len is not None:
        return int(max_duration.value) * int(state.dataloader_len)
    return None


def unwrap_ddp(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside any ``DistributedDataParallel`` wrappers (Composer wraps ``state.model`` for DDP)."""
    while isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model
