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


def test_prefix_opportunity_counts_positions_before_the_first_masked_token():
    import torch

    from bench.step_bench import make_cot_batch, prefix_opportunity

    batch = make_cot_batch(6, max_seq_len=256, seed=3)
    lengths = batch["attention_mask"].sum(1)
    assert int(lengths.max()) == batch["input_ids"].shape[1] <= 256
    # Every row: context, then rationale, then answer ending in EOS, then padding.
    for roles, n in zip(batch["token_roles"], lengths.tolist()):
        assert roles[0] == 0 and roles[n - 1] == 3 and bool((roles[n:] == -1).all())
    found = prefix_opportunity(batch)
    assert found["prefix_share"] + found["padding_share"] + found["suffix_share"] == pytest.approx(1.0, abs=1e-12)
    assert found["position_floor_over_lean_sft"] == pytest.approx(1 + found["suffix_share"])
    # With a model: dense FLOPs, the output layer at predicted positions once per pass.
    from bench.step_bench import count_parameters, stablelm_config

    config = stablelm_config("small")
    head = config.vocab_size * config.hidden_size
    body = count_parameters(config) - 2 * head  # untied embedding and output layer
    total, real = batch["input_ids"].numel(), int(lengths.sum())
    predicted = int((batch["labels"][:, 1:] != -100).sum())
    expected = (body * (real + found["suffix_share"] * total) + 2 * head * predicted) / (body * total + head * predicted)
    assert prefix_opportunity(batch, config=config)["flop_floor_over_lean_sft"] == pytest.approx(expected)
    # The prompt is never masked, so the prefix is at least the prompt of every row.
    prompt = float((batch["token_roles"] == 0).sum()) / batch["input_ids"].numel()
    assert found["prefix_share"] >= prompt and found["rows_without_a_masked_token"] == 0
    # mask_prob 0: nothing is masked, every row is all prefix and the floor is one pass.
    none = prefix_opportunity(batch, mask_prob=0.0)
    assert none["suffix_share"] == pytest.approx(0.0, abs=1e-12) and none["rows_without_a_masked_token"] == 6
    assert none["position_floor_over_lean_sft"] == pytest.approx(1.0)
    # mask_prob 1: the first maskable token (the rationale's first) is masked in every row.
    every = prefix_opportunity(batch, mask_prob=1.0)
    assert every["prefix_share"] == pytest.approx(prompt)
    assert torch.equal(torch.tensor(every["rows_without_a_masked_token"]), torch.tensor(0))
