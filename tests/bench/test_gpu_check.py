"""The one-call GPU check: its CPU dry run (same steps, tiny shapes) passes and writes one JSON."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def carried_names() -> list[str]:
    lines = (REPO / "scripts" / "gpu_wheels.txt").read_text().splitlines()
    return [spec for spec in (line.split("#")[0].strip() for line in lines) if spec]


def test_carried_wheels_are_packages_of_the_tested_environment():
    """fetch_gpu_wheels.sh pins each name to this environment's version: every name must be installed here."""
    names = carried_names()
    assert {"mosaicml", "mosaicml-streaming", "transformers", "tokenizers", "omegaconf", "huggingface-hub"} <= set(names)
    assert all("=" not in name for name in names)  # versions come from pyproject.toml via the venv
    for name in names:
        importlib.metadata.version(name)


def test_cuda_mode_without_a_gpu_says_so(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--device", "cuda", "--out",
                           str(tmp_path)], capture_output=True, text=True, cwd=REPO)
    if done.returncode == 0:
        pytest.skip("a CUDA device is visible")
    assert "no CUDA device visible" in done.stderr
    assert not (tmp_path / "gpu_check.json").exists()


@pytest.mark.slow
def test_dry_run_passes_every_check(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run"], cwd=REPO,
                          env={**os.environ, "OUT": str(out), "PYTHON": sys.executable},
                          capture_output=True, text=True)
    print(done.stdout[-3000:], done.stderr[-3000:])
    report = json.loads((out / "gpu_check.json").read_text())
    assert done.returncode == 0, report
    assert report["device"] == "cpu" and report["ok"]
    checks = report["checks"]
    assert set(checks) == {"loss_paths", "step_bench", "train_resume"}
    assert checks["loss_paths"]["total_rel_diff"] <= 1e-5
    bench = checks["step_bench"]
    assert {"remask_over_sft", "remask_over_lean_sft", "tokens_per_s"} <= set(bench)
    assert set(bench["median_step_s"]) == {"sft", "lean_sft", "remask"}
    resume = checks["train_resume"]
    assert sorted(resume["losses_resumed"]) == ["2", "3"]  # batch indices after the checkpoint at 2
    assert resume["a_matches_straight"]
    assert resume["max_loss_diff"] <= 1e-6 and resume["weights_max_rel_diff"] <= 1e-9
