"""Where llm-foundry's separate environment lives and how its subprocesses run (offline, CPU-only).

llm-foundry pins a different stack from this project's demo environment, so its runs happen in
``.venv-foundry`` (``scripts/test.sh`` creates it), driven from the tests in subprocesses.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.helpers.assets import REPO

__all__ = ["FOUNDRY_PYTHON", "FOUNDRY_VENV", "OWN_SPECIAL_TOKEN", "REPO", "foundry_env", "in_ci"]

FOUNDRY_VENV = Path(os.environ.get("REMASK_FOUNDRY_VENV", REPO / ".venv-foundry"))
FOUNDRY_PYTHON = FOUNDRY_VENV / "bin" / "python"
# A special token the base tokenizer of the llm-foundry tests ships with: the YAML route must keep it.
OWN_SPECIAL_TOKEN = "<|tool_call|>"


def in_ci() -> bool:
    """Under CI (``CI=true``) a missing environment is a failure, not a skip."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def foundry_env() -> dict[str, str]:
    """Offline, quiet, CPU-only: nothing may be downloaded at test time."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1"}
    env.pop("VIRTUAL_ENV", None)
    return env
