"""llm-foundry runs ReMask from the YAML recipes alone: entry points, exact weighting, same masks.

Each run is llm-foundry's own ``train_from_yaml`` (its ``llmfoundry train`` command) under Composer's
launcher, in ``.venv-foundry``, on a tiny local Llama, with ``algorithms: {remask: {}}``. The recipes
in ``yamls/foundry/`` are loaded as written and only the paths, sizes and CPU settings are changed.
``code_paths`` loads a test probe (metrics, masks, final weights) and nothing of ReMask's.
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.helpers.foundry_venv import FOUNDRY_VENV, REPO, foundry_env

pytestmark = pytest.mark.slow

PROBE_PLUGIN = REPO / "tests" / "foundry" / "probe_plugin.py"
RECIPES = {"finetuning": REPO / "yamls" / "foundry" / "remask_finetuning.yaml",
           "mds": REPO / "yamls" / "foundry" / "remask_mds.yaml"}
LOSS_KEYS = ("loss/train/total", "loss/train/ce_full", "loss/train/ce_masked", "loss/train/divergence")
GLOBAL_BATCH = 8
STEPS = 4
DEFAULT_WEIGHT = 0.1  # ReMask's divergence weight when `remask: {}`
NO_ROLES_WARNING = "do nothing: the batches have no 'token_roles'"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _set(config: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        config = config.setdefault(key, {})
    config[leaf] = value


class FoundryRun:
    """One finished run: its logged metrics per step, masks per (batch, sample), final weights."""

    def __init__(self, out: Path, result: subprocess.CompletedProcess) -> None:
        self.out = out
        self.output = result.stdout + result.stderr
        assert result.returncode == 0, f"llm-foundry run failed ({out}):\n{self.output[-6000:]}"
        self.losses: dict[int, dict[str, float]] = {}
        for line in (out / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            if "loss/train/total" in record["metrics"]:
                self.losses[record["step"]] = record["metrics"]
        self.masks: dict[tuple[int, tuple[int, ...]], list[int]] = {}
        for path in sorted(out.glob("masks-rank*.json")):
            for row in json.loads(path.read_text()):
                key = (row["batch"], tuple(row["tokens"]))
                assert key not in self.masks, f"sample drawn twice in batch {row['batch']}"
                self.masks[key] = row["masked"]
        self.weights: dict[str, torch.Tensor] = torch.load(out / "weights.pt")


def _run(recipe: str, out: Path, assets: dict[str, Path], nproc: int, microbatch: int,
         extra: dict[str, Any]) -> FoundryRun:
    config = yaml.safe_load(RECIPES[recipe].read_text())
    overrides: dict[str, Any] = {
        "variables.model": str(assets["model"]), "variables.tokenizer": str(assets["tokenizer"]),
        "variables.max_seq_len": 128, "variables.run_name": out.name,
        "variables.train_jsonl": str(assets["sft_jsonl"]), "variables.data_dir": str(assets["corpus"]),
        # CPU, fp32, no FSDP (it needs CUDA); a few steps of a visible learning rate.
        "model.init_device": "cpu", "precision": "fp32", "fsdp_config": None, "save_folder": None,
        "global_train_batch_size": GLOBAL_BATCH, "device_train_microbatch_size": microbatch,
        "max_duration": f"{STEPS}ba", "console_log_interval": "1ba",
        # SGD: the final weights compare the runs' gradients (probe_plugin.py says why not Adam).
        "optimizer": {"name": "probe_sgd", "lr": 0.1},
        "train_loader.num_workers": 0, "train_loader.prefetch_factor": None,
        "train_loader.persistent_workers": False,
        # The only ReMask setting: none. Nothing of ReMask's comes through code_paths.
        "algorithms": {"remask": {}},
        "code_paths": [str(PROBE_PLUGIN)],
        "callbacks": {"probe": {"out_dir": str(out)}},
        "loggers": {"probe_metrics": {"path": str(out / "metrics.jsonl")}},
    }
    if recipe == "mds":  # the test corpus has one source
        overrides["train_loader.dataset.streams"] = {"tinycot": {"local": str(assets["corpus"] / "tinycot")}}
    for key, value in {**overrides, **extra}.items():
        _set(config, key, value)
    out.mkdir(parents=True)
    recipe_path = out / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(config, sort_keys=False))
    command = [str(FOUNDRY_VENV / "bin" / "composer"), "-n", str(nproc), "--master_port", str(_free_port()),
               str(FOUNDRY_VENV / "bin" / "llmfoundry"), "train", str(recipe_path)]
    # No timeout tighter than the suite's: a slow machine is not a failure.
    result = subprocess.run(command, cwd=out, env=foundry_env(), capture_output=True, text=True)
    return FoundryRun(out, result)


@pytest.fixture(scope="module")
def foundry_runs(foundry_python, foundry_assets, tmp_path_factory):
    """Runs by (recipe, processes, microbatch size, other overrides), each trained once per module."""
    cache: dict[tuple[Any, ...], FoundryRun] = {}
    root = tmp_path_factory.mktemp("foundry-runs")

    def get(recipe: str, nproc: int, microbatch: int, *, remask: bool = True, **extra: Any) -> FoundryRun:
        """``remask=False``: the same run with ``algorithms: {}`` (the noise floor of a comparison)."""
        key = (recipe, nproc, microbatch, remask, *sorted(extra.items()))
        if key not in cache:
            name = f"{recipe}-n{nproc}-mb{microbatch}" + ("" if remask else "-noremask") + \
                "".join(f"-{k}={v}" for k, v in sorted(extra.items()))
            overrides = extra if remask else {**extra, "algorithms": {}}
            cache[key] = _run(recipe, root / name, foundry_assets, nproc, microbatch, overrides)
        return cache[key]

    return get


# The logged terms are float32 sums over at most GLOBAL_BATCH microbatch contributions each: their
# rounding is a few float32 ulps per contribution, so 4 ulps per contribution of the largest term bounds
# the identity's error (a wrong weighting is off by a whole term).
IDENTITY_ULPS = 4 * GLOBAL_BATCH
FLOAT32_EPS = torch.finfo(torch.float32).eps
# ReMask's step is the same float32 computation as llm-foundry's own plus a masked pass and the
# divergence: it may round up to this many times more than the same comparison without ReMask.
ROUNDING_GROWTH = 10


def _assert_losses_logged_and_consistent(run: FoundryRun) -> float:
    """The four loss keys at every step and total = 0.5 (ce_full + ce_masked) + w * divergence."""
    assert sorted(run.losses) == list(range(STEPS))
    worst = 0.0
    for step, metrics in run.losses.items():
        assert all(key in metrics for key in LOSS_KEYS), f"step {step}: {sorted(metrics)}"
        assert all(torch.isfinite(torch.tensor(metrics[key])) for key in LOSS_KEYS)
        assert metrics["loss/train/divergence"] > 0 and metrics["loss/train/ce_masked"] > 0
        expected = 0.5 * (metrics["loss/train/ce_full"] + metrics["loss/train/ce_masked"]) \
            + DEFAULT_WEIGHT * metrics["loss/train/divergence"]
        bound = IDENTITY_ULPS * FLOAT32_EPS * max(abs(metrics[key]) for key in LOSS_KEYS)
        worst = max(worst, abs(metrics["loss/train/total"] - expected) / bound)
    print(f"{run.out.name}: total vs 0.5*(ce_full+ce_masked) + {DEFAULT_WEIGHT}*divergence, worst error "
          f"{worst:.2g} of its float32 rounding bound")
    assert worst <= 1.0, f"identity off by {worst:.3g} times its rounding bound"
    return worst


def _noise_floor(first: FoundryRun, second: FoundryRun) -> float:
    """How far the final weights of the same two settings end apart without ReMask (at least one
    float32 ulp of the largest weight): the rounding of the comparison itself."""
    diff = max(float((first.weights[name] - second.weights[name]).abs().max()) for name in first.weights)
    largest = max(float(w.abs().max()) for w in first.weights.values())
    return max(diff, FLOAT32_EPS * largest)


def _comparison_floor(foundry_runs, recipe: str, reference: tuple[int, int], other: tuple[int, int],
                      **extra: Any) -> float:
    """The rounding of comparing two settings ``(processes, microbatch)``: the larger of the same
    comparison without ReMask and of the reference run through ReMask's other layout (stacked
    ``[full; masked]`` instead of shared prefixes: another float32 route to the same step, as another
    microbatch split packs the shared-prefix segments differently)."""
    without = _noise_floor(foundry_runs(recipe, *reference, remask=False),
                           foundry_runs(recipe, *other, remask=False, **extra))
    layouts = _noise_floor(foundry_runs(recipe, *reference),
                           foundry_runs(recipe, *reference, **{"algorithms.remask.forward_layout": "stacked"}))
    print(f"{recipe}: floor without ReMask {without:.2g}, between ReMask's layouts {layouts:.2g}")
    return max(without, layouts)


def _assert_same_training(reference: FoundryRun, other: FoundryRun, floor: float) -> None:
    """Same masks for the same samples at the same step, and the same final weights up to
    ``ROUNDING_GROWTH`` times ``floor``, the comparison's own rounding (``_comparison_floor``)."""
    assert set(other.masks) == set(reference.masks)
    assert len(reference.masks) == GLOBAL_BATCH * STEPS
    assert all(other.masks[key] == reference.masks[key] for key in reference.masks)
    assert any(list(tokens) != masked for (_, tokens), masked in reference.masks.items())  # masks were drawn
    assert set(other.weights) == set(reference.weights)
    worst = max(float((other.weights[name] - reference.weights[name]).abs().max()) for name in reference.weights)
    print(f"{other.out.name} vs {reference.out.name}: {len(reference.masks)} of {len(reference.masks)} samples "
          f"masked alike, final weights differ by {worst:.2g} (rounding floor: {floor:.2g})")
    assert worst <= ROUNDING_GROWTH * floor, f"final weights differ by {worst:.3g}; rounding floor {floor:.3g}"


def test_finetuning_loader_one_process(foundry_runs, foundry_assets):
    run = foundry_runs("finetuning", 1, GLOBAL_BATCH)
    _assert_losses_logged_and_consistent(run)
    # remask_tokenizer added <|mask|> and the tags; allow_embedding_resizing made room for them.
    from transformers import AutoConfig

    base_vocab = AutoConfig.from_pretrained(foundry_assets["model"]).vocab_size
    (embedding,) = [w for name, w in run.weights.items() if name.endswith("embed_tokens.weight")]
    assert embedding.shape[0] >= base_vocab + 5
    # llm-foundry's loaders carry no token roles; `remask: {}` leaves the CoT label rules at their
    # default (the card's 0.1 where roles exist), so nothing is warned about (an explicit value would).
    assert NO_ROLES_WARNING not in run.output


@pytest.mark.dist
def test_finetuning_loader_two_processes_with_microbatches_match_one(foundry_runs):
    reference = foundry_runs("finetuning", 1, GLOBAL_BATCH)
    run = foundry_runs("finetuning", 2, 2)  # interleaved sampler, 2 microbatches per rank
    _assert_losses_logged_and_consistent(run)
    floor = _comparison_floor(foundry_runs, "finetuning", (1, GLOBAL_BATCH), (2, 2))
    _assert_same_training(reference, run, floor)


def test_finetuning_loader_with_llm_foundry_token_weighting_matches_one_microbatch(foundry_runs):
    reference = foundry_runs("finetuning", 1, GLOBAL_BATCH)  # one microbatch: any weighting gives 1
    run = foundry_runs("finetuning", 1, 2, accumulate_train_batch_on_tokens=True)  # llm-foundry's default
    _assert_losses_logged_and_consistent(run)
    # With Adam this comparison was 2.2e-6 with ReMask against 1.5e-7 without it here, and 2.2e-6 against 5.3e-6
    # on another machine: one weight whose gradient is near zero, where Adam's update is its rounding's sign.
    floor = _comparison_floor(foundry_runs, "finetuning", (1, GLOBAL_BATCH), (1, 2),
                              accumulate_train_batch_on_tokens=True)
    _assert_same_training(reference, run, floor)


def test_mds_loader_one_process(foundry_runs):
    run = foundry_runs("mds", 1, GLOBAL_BATCH)
    _assert_losses_logged_and_consistent(run)
    assert NO_ROLES_WARNING not in run.output  # token_roles reach ReMask: its CoT label rules apply


@pytest.mark.dist
def test_mds_loader_two_processes_with_microbatches_match_one(foundry_runs):
    reference = foundry_runs("mds", 1, GLOBAL_BATCH)
    run = foundry_runs("mds", 2, 2)
    _assert_losses_logged_and_consistent(run)
    floor = _comparison_floor(foundry_runs, "mds", (1, GLOBAL_BATCH), (2, 2))
    _assert_same_training(reference, run, floor)
