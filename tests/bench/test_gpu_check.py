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


def wheel_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "scripts" / "gpu_wheels.txt").read_text().splitlines():
        spec = line.split("#")[0].strip()
        if spec:
            name, version = spec.split("==")
            pins[name] = version
    return pins


def test_carried_wheels_are_the_versions_the_tests_run_with():
    """The GPU machine gets exactly the stack CI tests (Composer, streaming, transformers, tokenizers, ...)."""
    pins = wheel_pins()
    assert {"mosaicml", "mosaicml-streaming", "transformers", "tokenizers", "omegaconf", "huggingface-hub"} <= set(pins)
    assert pins["transformers"].startswith("4.") and pins["tokenizers"].startswith("0.21")
    core = ("mosaicml", "mosaicml-streaming", "transformers", "tokenizers")  # the rest may float in a fresh venv
    assert {name: importlib.metadata.version(name) for name in core} == {name: pins[name] for name in core}
    for name in pins:  # every carried package is one the tested environment has
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
