"""Recipe plugins (``code_paths``) for the fault tests: die like a preempted node, or produce a NaN loss."""

import io
import math
import os
import signal

import composer.utils.checkpoint as composer_checkpoint
import torch
from composer.core import Callback, State
from composer.loggers import Logger

from composer_remask.train.registry import callbacks


@callbacks.register("kill_at_batch", override=True)
class KillAtBatch(Callback):
    """Dies like a preempted node: no cleanup, no final checkpoint."""

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def batch_end(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


@callbacks.register("kill_while_saving_batch", override=True)
class KillWhileSavingBatch(Callback):
    """SIGKILL in the middle of writing the checkpoint of ``batch``: half the file is on disk.

    Composer writes a checkpoint straight to its final name (``_write_checkpoint_file``), so a kill
    there leaves a truncated ``ep*-ba*-rank0.pt``; this writes the first half of the real bytes
    and dies, as a kill -9 or a full disk would.
    """

    def __init__(self, batch: int) -> None:
        self.batch = batch
        original = composer_checkpoint._write_checkpoint_file

        def write_then_maybe_die(state_dict, filename: str) -> None:
            if f"-ba{self.batch}-" not in os.path.basename(filename):
                return original(state_dict, filename)
            buffer = io.BytesIO()
            torch.save(state_dict, buffer)
            data = buffer.getvalue()
            with open(filename, "wb") as handle:
                handle.write(data[: len(data) // 2])
                handle.flush()
                os.fsync(handle.fileno())
            os.kill(os.getpid(), signal.SIGKILL)

        composer_checkpoint._write_checkpoint_file = write_then_maybe_die


@callbacks.register("nan_loss_at_batch", override=True)
class NanLossAtBatch(Callback):
    """Turns the loss of ``batch`` (1-based, as logged) into NaN, as a diverging run would."""

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def after_loss(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) + 1 != self.batch:
            return
        if isinstance(state.loss, dict):
            state.loss = {key: value * math.nan for key, value in state.loss.items()}
        else:
            state.loss = state.loss * math.nan
