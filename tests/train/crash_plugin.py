"""A recipe plugin (``code_paths``) for the kill-and-resume test: SIGKILL the process at a batch."""

import os
import signal

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
