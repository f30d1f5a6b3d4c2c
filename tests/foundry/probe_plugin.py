"""Test-only llm-foundry plugin (``code_paths``): records what a run logged, masked and learned.

It registers nothing of ReMask's (that must come from the package's entry points), only:

* logger ``probe_metrics``: every logged metric, rank 0, one JSON line per call, full precision;
* callback ``probe``: per rank, the masked input ids ReMask drew for each sample, keyed by the
  sample's attended tokens and the batch index; at the end of training the model's weights (rank 0);
* optimizer ``probe_sgd``: plain SGD, so final weights move linearly with the gradients and two
  runs compare by their gradients' rounding (an adaptive optimizer divides each update by the
  gradient's own size, so a gradient element near zero turns its rounding into a whole step).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger, LoggerDestination
from composer.utils import dist
from llmfoundry.registry import callbacks, loggers, optimizers

MASKED_INPUT_IDS_KEY = "remask_masked_input_ids"


class ProbeMetrics(LoggerDestination):
    def __init__(self, path: str) -> None:
        self.path = path

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if dist.get_global_rank() != 0:
            return
        values = {key: float(value) for key, value in metrics.items() if isinstance(value, (int, float))}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "metrics": values}) + "\n")


class Probe(Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.masks: list[dict[str, Any]] = []

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.BATCH_START:
            # Callbacks run after the algorithms, so ReMask's masked copy of the batch is there.
            batch = state.batch
            masked = batch.get(MASKED_INPUT_IDS_KEY)
            if masked is None:
                return
            for row in range(int(batch["input_ids"].shape[0])):
                attended = batch["attention_mask"][row].bool()
                self.masks.append({
                    "batch": int(state.timestamp.batch),
                    "tokens": batch["input_ids"][row][attended].tolist(),
                    "masked": masked[row][attended].tolist(),
                })
        elif event == Event.FIT_END:
            rank = dist.get_global_rank()
            with open(os.path.join(self.out_dir, f"masks-rank{rank}.json"), "w") as f:
                json.dump(self.masks, f)
            if rank == 0:
                model = state.model.module if hasattr(state.model, "module") else state.model
                weights = {name: p.detach().cpu().clone() for name, p in model.named_parameters()}
                torch.save(weights, os.path.join(self.out_dir, "weights.pt"))


loggers.register("probe_metrics", func=ProbeMetrics)
callbacks.register("probe", func=Probe)
optimizers.register("probe_sgd", func=torch.optim.SGD)
