"""One Cycle cosine learning-rate schedule as a Composer scheduler (no momentum cycling).

The ReMask-3B card trains with a One Cycle cosine schedule. PyTorch's ``OneCycleLR`` also cycles
momentum and needs the number of steps up front; this version is a stateless Composer scheduler
that reads the run length from the trainer and only scales the learning rate, so it works with any
optimizer (Lilith has no momentum to cycle) and with checkpoint resumption.
"""

from __future__ import annotations

import math

from composer.core import State, TimeUnit

from composer_remask.checks import finite_number
from composer_remask.runtime import run_length_in_batches

__all__ = ["OneCycleCosineScheduler"]


def _cosine_from_to(start: float, end: float, fraction: float) -> float:
    """Half a cosine from ``start`` (fraction 0) to ``end`` (fraction 1)."""
    fraction = min(max(fraction, 0.0), 1.0)
    return end + (start - end) / 2.0 * (math.cos(math.pi * fraction) + 1.0)


class OneCycleCosineScheduler:
    r"""One Cycle with cosine annealing, on batches, as a learning-rate multiplier.

    With :math:`T` the run length in batches and :math:`t` the current batch (0-based):

    - warm-up, :math:`t \le p T - 1`: cosine from :math:`1/d` up to :math:`1`;
    - decay, after that until :math:`T - 1`: cosine from :math:`1` down to :math:`1/(d \cdot f)`.

    The optimizer's ``lr`` is the peak. Step boundaries follow PyTorch's
    ``OneCycleLR(anneal_strategy='cos', three_phase=False)``, so the curves are identical, minus
    its momentum cycling.

    Args:
        pct_start: fraction :math:`p` of the run spent warming up (PyTorch default 0.3).
        div_factor: :math:`d`, the start learning rate is ``lr / div_factor``.
        final_div_factor: :math:`f`, the end learning rate is ``lr / (div_factor * final_div_factor)``.

    The run length comes from ``max_duration`` in batches or epochs (epochs times batches per
    epoch); a scale-schedule ratio stretches it.
    """

    def __init__(self, pct_start: float = 0.3, div_factor: float = 25.0, final_div_factor: float = 1e4) -> None:
        pct_start = finite_number(pct_start, "one_cycle_cosine: pct_start", low=0.0, high=1.0, low_open=True,
                                  high_open=True)
        div_factor = finite_number(div_factor, "one_cycle_cosine: div_factor", low=0.0, low_open=True)
        final_div_factor = finite_number(final_div_factor, "one_cycle_cosine: final_div_factor", low=0.0,
                                         low_open=True)
        self.pct_start = pct_start
        self.div_factor = div_factor
        self.final_div_factor = final_div_factor

    def __call__(self, state: State, ssr: float = 1.0) -> float:
        total = _run_length_in_batches(state) * ssr
        step = int(state.timestamp.batch)
        start = 1.0 / self.div_factor
        end = start / self.final_div_factor
        warmup_end = self.pct_start * total - 1
        decay_end = total - 1
        if warmup_end > 0 and step <= warmup_end:
            return _cosine_from_to(start, 1.0, step / warmup_end)
        if decay_end <= warmup_end:
            return end
        return _cosine_from_to(1.0, end, (step - warmup_end) / (decay_end - warmup_end))


def _run_length_in_batches(state: State) -> float:
    total = run_length_in_batches(state)
    if total is not None:
        return float(total)
    max_duration = state.max_duration
    if max_duration is None:
        raise RuntimeError("one_cycle_cosine needs the trainer's max_duration")
    if max_duration.unit == TimeUnit.EPOCH:
        raise RuntimeError("one_cycle_cosine with max_duration in epochs needs a dataloader with a length")
    raise ValueError(
        f"one_cycle_cosine needs max_duration in batches ('ba') or epochs ('ep'), got {max_duration}")
