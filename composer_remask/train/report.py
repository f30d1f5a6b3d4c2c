"""What a person watching a run sees: a compact line every few batches and a summary at the end."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from composer.core import Callback, State, Time, TimeUnit
from composer.loggers import Logger
from composer.utils import dist
from tqdm import tqdm

from composer_remask.runtime import run_length_in_batches

__all__ = ["RunReport", "RunSummary"]

LOSS_PREFIX = "loss/train/"


def _write(line: str) -> None:
    """Print above Composer's progress bar (tqdm) without breaking it."""
    tqdm.write(line, file=sys.stderr)


class RunReport(Callback):
    """Prints ``[epoch 1 batch 20/120] loss 2.31 (ce_full 2.2, ce_masked 2.4, divergence 0.05) lr 3.1e-06``.

    Every ``log_interval`` (``"10ba"``, ``"1ep"`` or an int of batches) and at the last batch, on
    rank 0; keeps the last ``window`` batches' losses for the summary at the end of the run.
    """

    def __init__(self, log_interval: str | int = "10ba", window: int = 10) -> None:
        interval = Time.from_input(log_interval, TimeUnit.BATCH)
        if interval.unit not in (TimeUnit.BATCH, TimeUnit.EPOCH) or interval.value <= 0:
            raise ValueError(f"console_log_interval must be a positive number of batches or epochs, got {log_interval}")
        self.interval = interval
        self.recent: deque[dict[str, float]] = deque(maxlen=window)
        self.last_lr: float | None = None
        self.started: float | None = None
        self.total_batches: int | None = None

    def fit_start(self, state: State, logger: Logger) -> None:
        self.started = time.monotonic()
        self.total_batches = run_length_in_batches(state)

    def batch_end(self, state: State, logger: Logger) -> None:
        losses = {key[len(LOSS_PREFIX):]: float(value) for key, value in (state.total_loss_dict or {}).items()
                  if key.startswith(LOSS_PREFIX)}
        self.recent.append(losses)
        self.last_lr = float(state.optimizers[0].param_groups[0]["lr"]) if state.optimizers else None
        batch = int(state.timestamp.batch)
        on_interval = self.interval.unit == TimeUnit.BATCH and batch % self.interval.value == 0
        if on_interval or batch == self.total_batches:
            self._print(state, losses)

    def epoch_end(self, state: State, logger: Logger) -> None:
        if self.interval.unit == TimeUnit.EPOCH and int(state.timestamp.epoch) % self.interval.value == 0:
            self._print(state, self.recent[-1] if self.recent else {})

    def _print(self, state: State, losses: dict[str, float]) -> None:
        if dist.get_global_rank() != 0:
            return
        of = f"/{self.total_batches}" if self.total_batches else ""
        line = f"[epoch {int(state.timestamp.epoch)} batch {int(state.timestamp.batch)}{of}] {format_losses(losses)}"
        if self.last_lr is not None:
            line += f" lr {self.last_lr:.3g}"
        _write(line)

    def mean_losses(self) -> dict[str, float]:
        """Mean of each loss term over the last ``window`` batches."""
        keys = {key for losses in self.recent for key in losses}
        means = {}
        for key in sorted(keys):
            values = [losses[key] for losses in self.recent if key in losses]
            means[key] = sum(values) / len(values)
        return means

    def wall_seconds(self) -> float:
        return time.monotonic() - self.started if self.started is not None else 0.0


def format_losses(losses: dict[str, float]) -> str:
    if not losses:
        return "loss n/a"
    total = losses.get("total")
    terms = ", ".join(f"{key} {value:.4f}" for key, value in losses.items() if key != "total")
    text = f"loss {total:.4f}" if total is not None else ""
    return f"{text} ({terms})" if terms and text else (text or terms)


@dataclasses.dataclass
class RunSummary:
    """The end of a run in a few lines: where things are and how it went."""

    run_name: str
    batches: int
    epochs: int
    samples: int
    wall_seconds: float
    final_losses: dict[str, float]
    last_lr: float | None
    eval_metrics: dict[str, float]
    checkpoint: str | None
    export_folder: str | None
    window: int = 10

    def format(self) -> str:
        lines = [
            f"== run {self.run_name}: done ==",
            f"trained      {self.batches} batches, {self.epochs} epochs, {self.samples} samples in "
            f"{self.wall_seconds:.0f} s",
            f"final losses {format_losses(self.final_losses)}  (mean of the last {self.window} batches)",
        ]
        if self.last_lr is not None:
            lines.append(f"final lr     {self.last_lr:.3g}")
        if self.eval_metrics:
            lines.append("eval         " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(self.eval_metrics.items())))
        lines.append(f"checkpoint   {self.checkpoint or '(none: set save_folder)'}")
        if self.export_folder:
            lines.append(f"HF export    {self.export_folder}")
            lines.append(f"next         remask-eval {self.export_folder} --tasks gsm8k,arc_challenge")
        else:
            lines.append("HF export    (none: set export_folder, or run remask-export CHECKPOINT --out DIR)")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def latest_checkpoint(saved: list[str], save_folder: str | None) -> str | None:
    """The newest checkpoint written by this run, else the save folder's ``latest`` link."""
    if saved:
        return str(saved[-1])
    if save_folder:
        latest = Path(save_folder) / "latest-rank0.pt"
        if latest.exists():
            return str(latest.resolve())
    return None
