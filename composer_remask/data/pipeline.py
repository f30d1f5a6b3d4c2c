"""Rows to encoded examples, chunk by chunk, in this process or in worker processes.

Chunks come back in input order whatever the number of workers, so the output does not depend on
it. Kept apart from the writer: workers never need streaming or the MDS writer.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import multiprocessing.context
import os
import signal
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import numpy as np

from composer_remask.data.formats import FIT_TRUNCATED, RoleEncoder, fit_to_length
from composer_remask.data.sources import DataError, RawRecord, parse_record


@dataclass
class RowOutcome:
    """What became of one input row: encoded arrays, or why it was skipped."""

    number: int
    input_ids: np.ndarray | None = None
    token_roles: np.ndarray | None = None
    truncated: bool = False
    skip_reason: str | None = None
    error: DataError | None = None  # set for bad input (not for over-long drops)
    origin: str | None = None


def encode_chunk(kind: str, records: Sequence[RawRecord], encoder: RoleEncoder, max_seq_len: int,
                 *, path: str, unit: str) -> list[RowOutcome]:
    """Parse, validate, tokenize (one batched call) and fit a chunk of rows; one outcome per row."""
    outcomes: list[RowOutcome] = []
    valid: list[tuple[RowOutcome, object]] = []
    for record in records:
        try:
            example, origin = parse_record(kind, record, path=path, unit=unit)
        except DataError as error:
            outcomes.append(RowOutcome(record.number, skip_reason=error.reason, error=error))
            continue
        outcome = RowOutcome(record.number, origin=origin)
        outcomes.append(outcome)
        valid.append((outcome, example))
    encoded = encoder.encode_batch([example for _, example in valid])
    for (outcome, _), (input_ids, token_roles) in zip(valid, encoded):
        input_ids, token_roles, fit = fit_to_length(input_ids, token_roles, max_seq_len)
        if len(input_ids) == 0:
            outcome.skip_reason = fit
        else:
            outcome.input_ids, outcome.token_roles = input_ids, token_roles
            outcome.truncated = fit == FIT_TRUNCATED
    return outcomes


_worker_encoder: RoleEncoder | None = None
_worker_max_seq_len = 0


def _exit_when_the_parent_dies(parent_alive: multiprocessing.connection.Connection) -> None:
    """Block until the parent's end of ``parent_alive`` closes, then end this worker at once.

    The kernel closes that end when the parent exits in any way (SIGKILL included), while a
    worker blocked on its task queue would otherwise wait forever: the queue's write end is
    held by the workers themselves, so they never see it close.
    """
    with suppress(EOFError, OSError):
        parent_alive.recv_bytes()
    os._exit(1)


def _init_worker(encoder: RoleEncoder, max_seq_len: int, parent_alive: multiprocessing.connection.Connection) -> None:
    global _worker_encoder, _worker_max_seq_len
    threading.Thread(target=_exit_when_the_parent_dies, args=(parent_alive,), name="parent-death-watch",
                     daemon=True).start()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one Rust thread per worker: processes are the parallelism
    # Importing composer_remask installs Composer's SIGTERM/SIGINT handlers (sys.exit), which a
    # worker blocked waiting for tasks may never act on: die on SIGTERM, and leave Ctrl-C to the
    # parent, which tears the pool down.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_encoder, _worker_max_seq_len = encoder, max_seq_len


def _encode_chunk_in_worker(task: tuple[str, str, str, list[RawRecord]]) -> list[RowOutcome]:
    kind, path, unit, records = task
    assert _worker_encoder is not None
    return encode_chunk(kind, records, _worker_encoder, _worker_max_seq_len, path=path, unit=unit)


class BuildInterrupted(KeyboardInterrupt):
    """A termination signal stopped the build; raised like Ctrl-C's KeyboardInterrupt so cleanup runs."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


TERMINATION_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextmanager
def termination_raises_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM/SIGHUP raise ``BuildInterrupted`` in the main thread, as Ctrl-C does.

    Their default action ends the process on the spot, skipping the cleanup of the partial
    output and the shutdown of the workers. Ctrl-C (SIGINT, with Python's own handler) is taken
    over the same way, so that after the first signal of any of them, repeats are ignored until
    the block (and the cleanup inside it) ends: a second Ctrl-C cannot cut the cleanup short.
    Signals whose handler the caller has set are left to that handler. Outside the main thread,
    signals cannot be handled: no change.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in (*TERMINATION_SIGNALS, signal.SIGINT)}
    handled = [signum for signum, handler in previous.items()
               if handler == signal.SIG_DFL or (signum == signal.SIGINT and handler is signal.default_int_handler)]

    def interrupt(signum: int, frame: object) -> None:
        for other in handled:
            signal.signal(other, signal.SIG_IGN)
        raise BuildInterrupted(signum)

    for signum in handled:
        signal.signal(signum, interrupt)
    try:
        yield
    finally:
        for signum in handled:
            signal.signal(signum, previous[signum])


def chunked(records: Iterable[RawRecord], size: int) -> Iterator[list[RawRecord]]:
    chunk: list[RawRecord] = []
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _pool_context() -> multiprocessing.context.BaseContext:
    """``forkserver`` where available, else ``spawn``.

    Workers fork from a fresh server process that imported this module (and the caller's main
    script) once: a plain fork would copy the caller's threads, locks and signal handlers, and
    spawn would re-import composer_remask (and Composer, seconds) in every worker. As with any
    multiprocessing, a script that builds with ``workers > 1`` needs an
    ``if __name__ == "__main__":`` guard; the ``remask-data`` command has one.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["__main__", __name__])
        return context
    return multiprocessing.get_context("spawn")


class ChunkEncoder:
    """Encodes chunks in order; with ``workers > 1`` in a pool of worker processes.

    Use as a context manager so the pool is shut down even when the build stops early. A worker
    that dies (killed, out of memory) fails the build instead of hanging it; workers end
    themselves when this process dies, even by SIGKILL.
    """

    def __init__(self, encoder: RoleEncoder, max_seq_len: int, workers: int = 1) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.encoder, self.max_seq_len, self.workers = encoder, max_seq_len, workers
        self._executor: ProcessPoolExecutor | None = None
        self._parent_ends: tuple[multiprocessing.connection.Connection, ...] = ()
        if workers > 1:
            # Workers get the read end (when the pool starts them, so both ends stay open until
            # ``close``); only this process holds the write end, which it never writes to and the
            # kernel closes when it exits, whatever the cause.
            watched, alive = multiprocessing.Pipe(duplex=False)
            self._parent_ends = (watched, alive)
            self._executor = ProcessPoolExecutor(workers, mp_context=_pool_context(), initializer=_init_worker,
                                                 initargs=(encoder, max_seq_len, watched))

    def map(self, kind: str, chunks: Iterable[list[RawRecord]], *, path: str,
            unit: str) -> Iterator[list[RowOutcome]]:
        if self._executor is None:
            for chunk in chunks:
                yield encode_chunk(kind, chunk, self.encoder, self.max_seq_len, path=path, unit=unit)
            return
        # A bounded window of chunks in flight keeps memory flat; results are taken in order.
        in_flight: deque[Future] = deque()
        try:
            for chunk in chunks:
                in_flight.append(self._executor.submit(_encode_chunk_in_worker, (kind, path, unit, chunk)))
                if len(in_flight) >= 2 * self.workers:
                    yield in_flight.popleft().result()
            while in_flight:
                yield in_flight.popleft().result()
        except BrokenProcessPool as error:
            raise RuntimeError("a tokenizer worker process died (killed, out of memory, or a script without "
                               "an `if __name__ == '__main__':` guard); retry with fewer --workers") from error

    def close(self, *, abort: bool = False) -> None:
        """Wait for the workers to exit; with ``abort``, drop the chunks not yet started."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=abort)
            self._executor = None
        for end in self._parent_ends:
            end.close()
        self._parent_ends = ()

    def __enter__(self) -> ChunkEncoder:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.close(abort=exc_type is not None)
