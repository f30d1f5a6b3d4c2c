"""What both quality regimes share (``bench/quality.py`` and ``bench/quality_task/sweep.py``).

Running the pipeline's commands the way a user would (a subprocess each, logged, from the
repository root), reading the training curves back from Composer's file log, and the report's
pieces: mean ± std over seeds, the machine line, and the JSON + Markdown + plot a report writes.
Both regimes import this module; neither imports the other's helpers.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

__all__ = ["REPO", "SHM_RACE", "format_mean_std", "machine", "mean_std", "read_curves", "repo_relative",
           "run_all", "run_logged", "run_with_retry", "smooth", "smoothed_curves", "subprocess_env", "tail_mean",
           "write_report"]


# --------------------------------------------------------------------------------- subprocesses

def subprocess_env(threads: int, device: str) -> dict[str, str]:
    """Offline, ``threads`` torch threads, the repository importable (``python -m bench...``), CPU-only
    when ``device`` is the CPU."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # Composer trains on a GPU whenever it sees one
    return env


def repo_relative(path: Path) -> str:
    """``path`` relative to the repository when it is inside it (commands stay short and portable)."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def run_logged(cmd: Sequence[str], log_path: Path, env: Mapping[str, str]) -> float:
    """Run ``cmd`` in the repo root with stdout+stderr to ``log_path``; return wall seconds.

    Raises ``RuntimeError`` with the log's tail if it fails.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with log_path.open("w", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        status = subprocess.run(list(cmd), cwd=REPO, env=dict(env), stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.monotonic() - start
    if status != 0:
        tail = "".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[-30:])
        raise RuntimeError(f"exit status {status}: {shlex.join(cmd)}\n(log {log_path})\n{tail}")
    return seconds


SHM_RACE = "FileExistsError"  # streaming: two datasets created at the same instant pick the same shm prefix


def run_with_retry(cmd: Sequence[str], log_path: Path, env: Mapping[str, str], attempts: int = 3) -> float:
    """``run_logged``, retried when mosaicml-streaming lost a start-up race for its shared memory.

    Two StreamingDatasets created in the same moment by different processes can pick the same
    shared-memory prefix (``FileExistsError: ... _locals``); nothing was trained yet, so start again.
    """
    for attempt in range(1, attempts + 1):
        try:
            return run_logged(cmd, log_path, env)
        except RuntimeError as error:
            text = log_path.read_text(encoding="utf-8", errors="replace")
            if attempt == attempts or SHM_RACE not in text or "_locals" not in text:
                raise
            print(f"streaming shared-memory race, retrying ({attempt}/{attempts - 1}): {error}".splitlines()[0],
                  flush=True)
            time.sleep(5 * attempt)
    raise AssertionError("unreachable")


def run_all(jobs: int, plan: Sequence[tuple[str, Callable[[], dict[str, Any]]]],
            failures: list[str]) -> list[dict[str, Any]]:
    """Run each ``(name, run)`` of ``plan``, ``jobs`` at a time; the records of those that finished.

    A failed run does not stop the others: its ``"name: error"`` goes to ``failures``, reported at the end.
    """
    records = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(run): name for name, run in plan}
        for future, name in futures.items():
            try:
                records.append(future.result())
            except Exception as error:  # keep the other runs; report at the end
                failures.append(f"{name}: {error}")
                print(f"[{name}] FAILED: {error}", file=sys.stderr, flush=True)
    return records


# ------------------------------------------------------------------------------------- curves

_METRIC_LINE = re.compile(r"^\[metric\]\[batch=(\d+)\]: loss/train/(\w+): (\S+)")


def read_curves(log_path: Path) -> dict[str, list[tuple[int, float]]]:
    """Per-batch loss terms from Composer's FileLogger (``[metric][batch=N]: loss/train/ce_full: X``).

    Composer logs the loss of the batch that just finished under the batch counter before the
    increment, so batch ``N`` here is the ``N+1``-th optimizer step.
    """
    curves: dict[str, dict[int, float]] = {}
    with log_path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            match = _METRIC_LINE.match(line)
            if match:
                value = float(match.group(3))
                if math.isfinite(value):
                    curves.setdefault(match.group(2), {})[int(match.group(1)) + 1] = value
    return {key: sorted(points.items()) for key, points in curves.items()}


def smooth(points: Sequence[tuple[int, float]], window: int) -> list[list[float]]:
    """Means over consecutive windows of ``window`` batches: ``[[last step, mean], ...]``."""
    out = []
    for start in range(0, len(points), window):
        chunk = points[start:start + window]
        out.append([chunk[-1][0], round(statistics.fmean(v for _, v in chunk), 5)])
    return out


def smoothed_curves(curves: Mapping[str, Sequence[tuple[int, float]]]) -> dict[str, list[list[float]]]:
    """Every curve in about 100 points, as a run's record keeps it."""
    return {key: smooth(points, max(1, len(points) // 100)) for key, points in curves.items()}


def tail_mean(points: Sequence[tuple[int, float]], fraction: float = 0.1) -> float | None:
    if not points:
        return None
    count = max(1, int(len(points) * fraction))
    return statistics.fmean(v for _, v in points[-count:])


# ------------------------------------------------------------------------------------- report

def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of the values that exist (``0.0`` for one value)."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def format_mean_std(pair: tuple[float | None, float | None], scale: float = 1.0, digits: int = 1) -> str:
    """``mean ± std`` (times ``scale``), or ``–`` when there is no value."""
    mean, std = pair
    if mean is None:
        return "–"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def machine(device: str) -> str:
    """The machine line of a report: architecture, CPU count, and the GPU's name on CUDA."""
    text = f"{platform.machine()} {os.cpu_count()} CPUs"
    return text + (f" ({_gpu_name()})" if device == "cuda" else "")


def _gpu_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - informational only
        return "cuda"


def write_report(results: Mapping[str, Any], results_dir: Path, stem: str,
                 write_markdown: Callable[[Mapping[str, Any], Path], str],
                 plot: Callable[[Mapping[str, Any], Path], None]) -> str:
    """``STEM.json`` (every number), ``STEM.md`` (the tables) and ``STEM.png`` in ``results_dir``; the Markdown."""
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    text = write_markdown(results, results_dir / f"{stem}.md")
    plot(results, results_dir / f"{stem}.png")
    return text
