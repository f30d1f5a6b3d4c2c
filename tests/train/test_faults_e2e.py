"""Faults in real runs of the tiny recipe: a kill while saving, a NaN loss, a crafted load_path."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.helpers.checkpoints import crafted_checkpoint
from tests.helpers.recipes import REPO, TINY_RECIPE, run_train, tiny_overrides

pytestmark = pytest.mark.slow

PLUGIN = REPO / "tests" / "helpers" / "crash_plugin.py"


def test_killed_while_saving_resumes_from_the_previous_checkpoint(sample_corpus, tmp_path):
    """SIGKILL halfway through writing ep0-ba6: the rerun moves the half file aside and resumes from ba3."""
    run_dir = tmp_path / "run"
    common = [*tiny_overrides(sample_corpus, run_dir, max_duration="8ba", save_interval="3ba", eval_loader="null",
                              console_log_interval="1ba"), f"code_paths=[{PLUGIN}]"]
    killed = run_train([str(TINY_RECIPE), *common, "callbacks.kill_while_saving_batch={batch: 6}"], cwd=tmp_path)
    assert killed.returncode != 0
    folder = run_dir / "checkpoints"
    partial = folder / "ep0-ba6-rank0.pt"
    assert partial.stat().st_size < (folder / "ep0-ba3-rank0.pt").stat().st_size  # the crash left half a file

    resumed = run_train([str(TINY_RECIPE), *common], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "ep0-ba6-rank0.pt aside" in resumed.stderr
    assert "[epoch 0 batch 3/8]" not in resumed.stderr and "[epoch 0 batch 4/8]" in resumed.stderr
    assert json.loads((folder / "summary.json").read_text())["batches"] == 8
    assert any(p.name.startswith("ep0-ba6-rank0.pt.partial-") for p in folder.iterdir())
    assert (run_dir / "hf" / "model.safetensors").is_file()


def test_nan_loss_stops_before_saving_that_batch(sample_corpus, tmp_path):
    run_dir = tmp_path / "run"
    previous_export = run_dir / "hf"
    previous_export.mkdir(parents=True)
    (previous_export / "from-an-earlier-run.txt").write_text("keep me")
    result = run_train([str(TINY_RECIPE), *tiny_overrides(sample_corpus, run_dir, max_duration="4ba",
                                                           save_interval="1ba", eval_loader="null",
                                                           progress_bar="true"),
                        f"code_paths=[{PLUGIN}]", "callbacks.nan_loss_at_batch={batch: 2}"], cwd=tmp_path)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "non-finite training loss at batch 2" in result.stderr and "Traceback" not in result.stderr
    folder = run_dir / "checkpoints"
    assert sorted(p.name for p in folder.glob("ep*")) == ["ep0-ba1-rank0.pt"]
    assert os.readlink(folder / "latest-rank0.pt") == "ep0-ba1-rank0.pt"
    from composer_remask.checkpoints import load_checkpoint_file

    weights = load_checkpoint_file(folder / "ep0-ba1-rank0.pt")["state"]["model"]
    assert all(torch.isfinite(value).all() for value in weights.values() if value.is_floating_point())
    assert [p.name for p in previous_export.iterdir()] == ["from-an-earlier-run.txt"]
    # Captured stderr is not a terminal: no progress bar redraws, only the report's lines.
    assert "ba/s" not in result.stderr and "\r" not in result.stderr
    assert "[epoch 0 batch 2/4]" not in result.stderr or "loss nan" in result.stderr


def test_load_path_that_runs_code_is_refused(sample_corpus, tmp_path):
    marker = tmp_path / "code-ran"
    evil = crafted_checkpoint(tmp_path / "evil.pt", marker)
    result = run_train([str(TINY_RECIPE), *tiny_overrides(sample_corpus, tmp_path / "run", max_duration="1ba",
                                                           eval_loader="null", autoresume="false"),
                        f"load_path={evil}"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"load_path {str(evil)!r}" in result.stderr and "refused to unpickle" in result.stderr
    assert "trust_checkpoint_pickle" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()
