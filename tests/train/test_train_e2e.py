"""The tiny recipe end to end: train, export, load and generate; resume after a kill; two processes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from composer.utils.checkpoint import safe_torch_load
from safetensors.torch import load_file
from torch.distributed import checkpoint as dcp
from transformers import AutoModelForCausalLM, AutoTokenizer

from composer_remask.export import export_checkpoint
from composer_remask.export import main as export_main
from tests.helpers.recipes import REPO, TINY_RECIPE, run_train, tiny_overrides

pytestmark = pytest.mark.slow


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_tiny_recipe_trains_exports_and_generates(sample_corpus, tmp_path):
    run_dir = tmp_path / "run"
    result = run_train([str(TINY_RECIPE), *tiny_overrides(sample_corpus, run_dir, max_duration="6ba",
                                                           save_interval="3ba", eval_interval="3ba")],
                       cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # The summary names the checkpoint and the export; the console shows loss terms and lr.
    assert "== run tiny-cpu: done ==" in result.stdout
    assert f"HF export    {run_dir / 'hf'}" in result.stdout
    assert "[epoch 0 batch 6/6] loss" in result.stderr and "divergence" in result.stderr and " lr " in result.stderr
    summary = json.loads((run_dir / "checkpoints" / "summary.json").read_text())
    assert summary["batches"] == 6 and summary["checkpoint"].endswith("ep0-ba6-rank0.pt")
    assert {"total", "ce_full", "ce_masked", "divergence"} <= set(summary["final_losses"])
    assert "LanguageCrossEntropy" in summary["eval_metrics"]

    model = AutoModelForCausalLM.from_pretrained(run_dir / "hf")
    assert model.config.use_cache  # off for training, on again for generation
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "hf")
    assert "<|mask|>" in tokenizer.get_vocab()
    prompt = tokenizer("<|user|>\nWhat is 2 + 3?\n<|rationale|>\n", return_tensors="pt", add_special_tokens=False)
    out = model.generate(input_ids=prompt.input_ids, attention_mask=prompt.attention_mask, max_new_tokens=5,
                         min_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == prompt.input_ids.shape[1] + 5

    # The same weights come out of the saved Composer checkpoint (remask-export).
    assert export_main([str(run_dir / "checkpoints"), "--out", str(tmp_path / "from-ckpt")]) == 0
    live, from_checkpoint = weights(run_dir / "hf"), weights(tmp_path / "from-ckpt")
    assert live.keys() == from_checkpoint.keys()
    for key in live:
        torch.testing.assert_close(from_checkpoint[key], live[key], rtol=0, atol=0)
    # A torch.distributed.checkpoint folder (the layout of sharded FSDP checkpoints) exports the same.
    dcp.save(safe_torch_load(run_dir / "checkpoints" / "ep0-ba6-rank0.pt"), checkpoint_id=str(tmp_path / "dcp"))
    from_dcp = weights(export_checkpoint(tmp_path / "dcp", tmp_path / "from-dcp"))
    for key in live:
        torch.testing.assert_close(from_dcp[key], live[key], rtol=0, atol=0)
    bf16 = export_checkpoint(run_dir / "checkpoints" / "ep0-ba3-rank0.pt", tmp_path / "bf16", dtype="bfloat16")
    assert {t.dtype for t in weights(bf16).values()} == {torch.bfloat16}
    assert AutoModelForCausalLM.from_pretrained(bf16, torch_dtype="auto").dtype == torch.bfloat16


def test_killed_run_resumes_where_it_stopped(sample_corpus, tmp_path):
    """A run SIGKILLed at batch 5 (last checkpoint: batch 3) resumes with autoresume and ends with
    the same weights as a run that was never interrupted."""
    common = dict(max_duration="8ba", save_interval="3ba", eval_loader="null")
    plugin = REPO / "tests" / "helpers" / "crash_plugin.py"

    killed_dir = tmp_path / "killed"
    crash = [f"code_paths=[{plugin}]", "callbacks.kill_at_batch={batch: 5}"]
    first = run_train([str(TINY_RECIPE), *tiny_overrides(sample_corpus, killed_dir, **common), *crash],
                      cwd=tmp_path)
    assert first.returncode != 0
    assert sorted(p.name for p in (killed_dir / "checkpoints").glob("ep*.pt")) == ["ep0-ba3-rank0.pt"]

    resumed = run_train([str(TINY_RECIPE), *tiny_overrides(sample_corpus, killed_dir, **common)], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[epoch 0 batch 3/8]" not in resumed.stderr and "[epoch 0 batch 8/8]" in resumed.stderr
    assert json.loads((killed_dir / "checkpoints" / "summary.json").read_text())["batches"] == 8

    straight_dir = tmp_path / "straight"
    straight = run_train([str(TINY_RECIPE), *tiny_overrides(sample_corpus, straight_dir, **common)], cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    a, b = weights(killed_dir / "hf"), weights(straight_dir / "hf")
    for key in a:  # bit-exact: the checkpoint restores weights, optimizer state and RNG; the same kernels follow
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


@pytest.mark.dist
def test_two_processes_with_composer_launcher(sample_corpus, tmp_path):
    composer = shutil.which("composer", path=str(REPO / ".venv" / "bin")) or shutil.which("composer")
    assert composer is not None
    run_dir = tmp_path / "run"
    result = run_train([str(TINY_RECIPE), *tiny_overrides(sample_corpus, run_dir, max_duration="4ba",
                                                           eval_loader="null")],
                       cwd=tmp_path, launcher=[composer, "-n", "2", "--stdout", str(tmp_path / "rank{rank}.out"),
                                               "--stderr", str(tmp_path / "rank{rank}.err")])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    # Rank 0 prints through the launcher; rank 1 ran too (its output went to a file) but prints no summary.
    assert "== run tiny-cpu: done ==" in result.stdout and "trained      4 batches" in result.stdout
    assert (tmp_path / "rank1.out").exists() and "== run" not in (tmp_path / "rank1.out").read_text()
    assert json.loads((run_dir / "checkpoints" / "summary.json").read_text())["samples"] == 64  # global batch 16
    assert AutoModelForCausalLM.from_pretrained(run_dir / "hf") is not None
