"""Paths and subprocess helpers to run the recipes in tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.helpers.assets import REPO, TINY_TOKENIZER

__all__ = ["REPO", "TINY_RECIPE", "TINY_TOKENIZER", "run_train", "tiny_overrides"]

TINY_RECIPE = REPO / "yamls" / "tiny_cpu.yaml"


def tiny_overrides(corpus: dict[str, Path], run_dir: Path, **extra: object) -> list[str]:
    """Command-line overrides that point the tiny recipe at the test corpus and ``run_dir``."""
    overrides = {
        "variables.data_dir": corpus["train"],
        "variables.eval_data_dir": corpus["heldout"],
        "variables.run_dir": run_dir,
        "tokenizer.name": TINY_TOKENIZER,
        "progress_bar": False,
        **extra,
    }
    return [f"{key}={value}" for key, value in overrides.items()]


def run_train(args: list[str], cwd: Path, launcher: list[str] | None = None,
              env: dict | None = None) -> subprocess.CompletedProcess:
    """``python train.py ARGS`` (or under ``launcher``, e.g. ``composer -n 2``) in a subprocess.

    No wall-clock limit: a loaded machine is slow, not broken (CI's own timeout bounds a hang).
    """
    command = [*(launcher or [sys.executable]), str(REPO / "train.py"), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})})
