"""Facts read off a running Composer Trainer, defined once: the run length, the model under DDP,
and the FLOP count of the passes a batch really runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from composer.core import State, TimeUnit

from composer_remask.batch import forward_passes

__all__ = ["ForwardPreHook", "PassCountingFlops", "run_length_in_batches", "unwrap_ddp"]

# Marks the flops_per_batch wrapper installed for a fit, and holds the one-pass count it wraps.
_ONE_PASS_ATTR = "remask_one_pass_flops"


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


class PassCountingFlops:
    """For one fit, a model's one-pass ``flops_per_batch`` counts every pass a batch runs.

    The model counts one pass; only the algorithm knows the layout it runs a batch in (two whole
    passes, or the full rows plus the masked suffixes). The wrapper is removed by :meth:`restore`;
    one left by a fit that raised is unwrapped, never wrapped again, and counts right meanwhile
    since it reads the batch.
    """

    def __init__(self) -> None:
        self._installed: tuple[Any, Any] | None = None

    def install(self, model: Any, passes: Callable[[Any], float] = forward_passes) -> None:
        """Wrap ``model.flops_per_batch`` so it counts ``passes(batch)`` passes (default: ``forward_passes``)."""
        if not callable(getattr(model, "flops_per_batch", None)):
            return
        one_pass = getattr(model.flops_per_batch, _ONE_PASS_ATTR, model.flops_per_batch)
        own = vars(model).get("flops_per_batch")
        self._installed = (model, None if own is None or hasattr(own, _ONE_PASS_ATTR) else own)

        def flops_per_batch(batch: Any) -> float:
            return passes(batch) * one_pass(batch)

        setattr(flops_per_batch, _ONE_PASS_ATTR, one_pass)
        model.flops_per_batch = flops_per_batch

    def restore(self) -> None:
        if self._installed is None:
            return
        (model, own), self._installed = self._installed, None
        if own is not None:
            model.flops_per_batch = own
        else:
            vars(model).pop("flops_per_batch", None)


class ForwardPreHook:
    """One forward pre-hook (with keyword arguments) at a time on a module; removed by :meth:`remove`."""

    def __init__(self) -> None:
        self._handle: Any = None

    def install(self, module: torch.nn.Module | None, hook: Callable[..., None]) -> None:
        self.remove()  # left by a forward that never ran (e.g. an OOM retried by Composer)
        if module is not None:
            self._handle = module.register_forward_pre_hook(hook, with_kwargs=True)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
