"""``code_paths`` plugin of the GPU check: a logger that writes each batch's loss and the final weights' sums.

Registered as ``loggers.gpu_check_log``; rows go to the JSONL file named by ``GPU_CHECK_LOSS_LOG``
(rank 0). ``{"batch": n, "loss": total}`` per batch, then ``{"weights": {name: [sum, sum of
squares]}}`` at the end of fit, all-reduced over ranks so FSDP shards add up to whole tensors.
``GPU_CHECK_STOP_AT=N`` stops training after batch N of a longer ``max_duration``, so the learning
rate schedule (relative to ``max_duration``) is the one of the uninterrupted run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from composer.loggers import LoggerDestination
from composer.utils import dist

from composer_remask.train import registry


class GpuCheckLog(LoggerDestination):
    def __init__(self) -> None:
        self.path = Path(os.environ["GPU_CHECK_LOSS_LOG"])
        self.stop_at = int(os.environ.get("GPU_CHECK_STOP_AT") or 0)
        if dist.get_global_rank() == 0:
            self.path.write_text("")

    def _write(self, row: dict) -> None:
        if dist.get_global_rank() == 0:
            with self.path.open("a") as handle:
                handle.write(json.dumps(row) + "\n")

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        if "loss/train/total" in metrics:
            self._write({"batch": int(step), "loss": float(metrics["loss/train/total"])})

    def batch_end(self, state, logger) -> None:
        if self.stop_at and int(state.timestamp.batch) >= self.stop_at:
            state.stop_training()  # the checkpoint of this batch is still saved (BATCH_CHECKPOINT follows)

    def fit_end(self, state, logger) -> None:
        sums = {}
        for name, param in state.model.named_parameters():
            local = param.detach().double()
            stats = torch.stack([local.sum(), local.square().sum()]) if local.numel() else \
                torch.zeros(2, dtype=torch.float64, device=local.device)
            dist.all_reduce(stats)
            sums[name.replace("_fsdp_wrapped_module.", "")] = [float(v) for v in stats.cpu()]
        self._write({"weights": sums})


registry.loggers.register("gpu_check_log", GpuCheckLog, override=True)
