"""The quality benchmark's pieces: the synthetic task generator, the lm-eval task files, the log
parser and the report (table + plot) on made-up run records. The end-to-end grid itself
(`python -m bench.quality --quick`) trains three models and takes minutes, so it is not run here."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

from bench import quality
from bench.quality_task import common
from bench.quality_task.generate import (
    STYLES,
    Difficulty,
    generate_splits,
    make_problem,
    solve_prompt,
    write_splits,
)
from bench.quality_task.generate import main as generate_main
from composer_remask.tools.shared_memory import clean_unused_streaming_shared_memory
from tests.helpers.assets import REPO, TINY_TOKENIZER
from tests.helpers.limits import CI_LIMIT_S


def _check_rationale(row: dict[str, str]) -> None:
    """Every line ``a op k = r.`` is right, lines chain, and the last result is the target."""
    lines = row["rationale"].split(". ")
    previous = None
    for line in lines:
        a, op, k, eq, r = line.rstrip(".").split(" ")
        assert eq == "="
        a, k, r = int(a), int(k), int(r)
        assert r == {"+": a + k, "-": a - k, "*": a * k}[op], line
        if previous is not None:
            assert a == previous
        previous = r
    assert str(previous) == row["target"]


@pytest.mark.parametrize("style", STYLES)
def test_answers_are_right_by_recomputation(style: str) -> None:
    difficulty = Difficulty(style=style)
    rng = random.Random(3)
    for _ in range(500):
        row = make_problem(rng, difficulty)
        assert set(row) == {"prompt", "rationale", "target", "source"}
        assert solve_prompt(row["prompt"]) == int(row["target"])
        _check_rationale(row)
        steps = row["rationale"].count("=")
        assert difficulty.min_steps <= steps <= difficulty.max_steps
        values = [int(tok.rstrip(".")) for tok in row["rationale"].split() if tok.rstrip(".").isdigit()]
        assert all(0 <= v <= difficulty.max_value for v in values)


def test_splits_are_disjoint_and_deterministic(tmp_path: Path) -> None:
    train, test = generate_splits(3000, 300, seed=7)
    assert len(train) == 3000 and len(test) == 300
    train_prompts, test_prompts = {r["prompt"] for r in train}, {r["prompt"] for r in test}
    assert len(train_prompts) == 3000 and len(test_prompts) == 300   # no duplicates inside a split
    assert not train_prompts & test_prompts                         # nor across
    assert (train, test) == generate_splits(3000, 300, seed=7)
    assert generate_splits(3000, 300, seed=8)[1] != test

    meta = write_splits(tmp_path, 50, 20, seed=7)
    assert meta["train"] == 50 and meta["difficulty"]["max_steps"] == Difficulty().max_steps
    rows = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert rows == generate_splits(50, 20, seed=7)[1]


def test_excluded_prompts_are_never_drawn(tmp_path: Path) -> None:
    """The fine-tuning splits leave out the base model's own training problems (same distribution)."""
    words = Difficulty(min_steps=2, max_steps=3, style="words")
    base_rows, _ = generate_splits(2000, 0, seed=1000, difficulty=words)
    base = {r["prompt"] for r in base_rows}
    train, test = generate_splits(200, 100, seed=4321, difficulty=words)
    assert {r["prompt"] for r in train + test} & base  # without exclusion, the space is small enough to overlap
    base_file = tmp_path / "base.jsonl"
    base_file.write_text("".join(json.dumps(r) + "\n" for r in base_rows))
    assert generate_main([str(tmp_path / "ft"), "--train", "200", "--val", "50", "--test", "100", "--seed", "4321",
                          "--steps", "2-3", "--style", "words", "--exclude", str(base_file)]) == 0
    drawn = [json.loads(line)["prompt"] for name in ("train", "val", "test")
             for line in (tmp_path / "ft" / f"{name}.jsonl").read_text().splitlines()]
    assert len(drawn) == 350 and not set(drawn) & base


def test_too_small_a_space_is_an_error() -> None:
    tiny = Difficulty(min_steps=1, max_steps=1, max_value=3, max_start=1, max_operand=1, max_factor=2)
    with pytest.raises(ValueError, match="distinct problems"):
        generate_splits(100, 10, seed=0, difficulty=tiny)


def test_rows_build_with_the_tinycot_source(tmp_path: Path) -> None:
    """The rows are valid TinyCoT rows for the project's data pipeline (roles as expected)."""
    from composer_remask.batch import ROLE_ANSWER, ROLE_RATIONALE
    from composer_remask.data.sources import RawRecord, parse_record

    train, _ = generate_splits(5, 1, seed=0)
    example, origin = parse_record("tinycot", RawRecord(1, train[0]), path="x.jsonl", unit="line")
    assert origin == "synth-arith" and example.answer == train[0]["target"]
    from transformers import AutoTokenizer

    from composer_remask.data.formats import encode_example

    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    ids, roles = encode_example(tokenizer, example)
    answer = tokenizer.decode(ids[roles == ROLE_ANSWER], skip_special_tokens=False)
    assert answer == f"<|answer|>\n{train[0]['target']}{tokenizer.eos_token}"
    assert tokenizer.decode(ids[roles == ROLE_RATIONALE]) == train[0]["rationale"] + "\n"


def test_lm_eval_task_files(tmp_path: Path) -> None:
    yaml = pytest.importorskip("yaml")
    from bench.quality_task.lm_eval_task import (
        ANSWER_LL_TASK,
        GEN_TASK,
        RESPONSE_LL_TASK,
        STRICT_ANSWER,
        write_tasks,
    )

    write_splits(tmp_path / "data", 10, 5, seed=0)
    write_tasks(tmp_path / "data" / "test.jsonl", tmp_path / "tasks")
    gen = yaml.safe_load((tmp_path / "tasks" / f"{GEN_TASK}.yaml").read_text())
    assert gen["doc_to_text"].endswith("<|rationale|>\n") and gen["dataset_path"] == "json"
    assert Path(gen["dataset_kwargs"]["data_files"]["test"]).is_absolute()
    for name in (ANSWER_LL_TASK, RESPONSE_LL_TASK):
        assert yaml.safe_load((tmp_path / "tasks" / f"{name}.yaml").read_text())["output_type"] == "loglikelihood"
    import re

    assert re.findall(STRICT_ANSWER, "7 + 5 = 12.\n<|answer|>\n12") == ["12"]
    assert re.findall(STRICT_ANSWER, "7 + 5 = 12.\n12") == []      # no tag, no strict match


def test_read_curves_from_composer_file_log(tmp_path: Path) -> None:
    log = tmp_path / "train_log.txt"
    log.write_text("[hyperparameter]: seed: 0 \n"
                   "[metric][batch=0]: loss/train/total: 7.5 \n"
                   "[metric][batch=0]: loss/train/ce_full: 7.0 \n"
                   "[metric][batch=0]: metrics/train/LanguageCrossEntropy: 7.0 \n"
                   "[metric][batch=1]: loss/train/ce_full: 6.0 \n"
                   "[metric][batch=1]: loss/train/divergence: 0.25 \n")
    curves = common.read_curves(log)
    assert curves == {"total": [(1, 7.5)], "ce_full": [(1, 7.0), (2, 6.0)], "divergence": [(2, 0.25)]}
    assert common.smooth([(1, 1.0), (2, 3.0), (3, 5.0)], 2) == [[2, 2.0], [3, 5.0]]
    assert common.tail_mean([(i, float(i)) for i in range(1, 21)], 0.1) == 19.5


def _fake_results(seeds: tuple[int, ...] = (0, 1, 2)) -> dict:
    rng = random.Random(0)
    runs = []
    for seed in seeds:
        for method, spec in quality.METHODS.items():
            steps = list(range(1, 101))
            curves = {"ce_full": [[s, 3.0 / s ** 0.3] for s in steps]}
            if spec["mask_prob"] > 0:
                curves["divergence"] = [[s, 0.0 if s < 3 else 0.1 / s ** 0.2] for s in steps]
            runs.append({"method": method, "label": spec["label"], "seed": seed, "accuracy": rng.uniform(0.2, 0.8),
                         "accuracy_flexible": rng.uniform(0.2, 0.8), "answer_nll": rng.uniform(0.1, 2),
                         "answer_teacher_forced_acc": rng.uniform(0.5, 1), "response_nll": rng.uniform(1, 9),
                         "final_ce": 0.3, "final_divergence": 0.02 if spec["mask_prob"] else None,
                         "train_seconds": 100.0, "eval_seconds": 20.0, "curves": curves})
    settings = {"mode": "test", "steps": 100, "batch": 32, "n_train": 1000, "n_test": 100, "seeds": list(seeds),
                "difficulty": {}, "model": "tiny", "base_steps": 50, "lr": 1e-3, "device": "cpu", "jobs": 2, "threads": 1, "wall_seconds": 60.0,
                "machine": "test", "command": "python bench/quality.py --test"}
    return {"settings": settings, "summary": quality.summarize(runs), "runs": runs}


def test_summary_table_and_plot(tmp_path: Path) -> None:
    results = _fake_results()
    summary = results["summary"]
    assert list(summary) == list(quality.METHODS)
    sft = [r["accuracy"] for r in results["runs"] if r["method"] == "sft"]
    mean, std = summary["sft"]["accuracy"]
    assert mean == pytest.approx(sum(sft) / 3)
    assert std == pytest.approx((sum((a - mean) ** 2 for a in sft) / 2) ** 0.5)   # sample std over seeds
    assert summary["sft"]["final_divergence"] == (None, None)

    text = quality.report(results, tmp_path)
    assert f"{100 * mean:.1f} ± {100 * std:.1f}" in text
    assert "| SFT | 3 |" in text and "| ReMask | 3 |" in text and "python bench/quality.py --test" in text
    assert json.loads((tmp_path / "quality.json").read_text())["runs"][0]["method"] == "sft"
    png = (tmp_path / "quality.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    one_seed = _fake_results(seeds=(0,))
    assert "± 0.0" in quality.report(one_seed, tmp_path / "one")


def test_commands_differ_only_in_the_method_switch(tmp_path: Path) -> None:
    mode = quality.MODES["full"]
    base = tmp_path / "base" / "hf"
    commands = {m: quality.train_command(mode, m, 0, tmp_path / "run", tmp_path / "data", base) for m in quality.METHODS}
    differing = {i for i in range(len(commands["sft"])) if len({tuple(c)[i] for c in commands.values()}) > 1}
    for i in differing:
        assert all(c[i].startswith(("algorithms.remask.", "run_name=")) for c in commands.values())
    assert "algorithms.remask.mask_prob=0.0" in commands["sft"]
    assert "algorithms.remask.weight=0.0" in commands["masked_thought"]
    assert "algorithms.remask.weight=0.1" in commands["remask"]
    assert f"model.pretrained_model_name_or_path={base}" in commands["remask"]     # all fine-tune one base
    base_cmd = quality.train_command(mode, "sft", 1000, tmp_path / "b", tmp_path / "data", None)
    assert "model.pretrained=true" not in base_cmd and f"max_duration={mode.base_steps}ba" in base_cmd


@pytest.mark.slow
def test_quick_pipeline_end_to_end(tmp_path: Path) -> None:
    """generate -> remask-data build -> train.py -> HF export -> lm-eval, for one method, a few steps."""
    import subprocess

    clean_unused_streaming_shared_memory()
    out = tmp_path / "work"
    cmd = [sys.executable, "-m", "bench.quality", "--quick", "--methods", "remask", "--steps", "3", "--base-steps", "2", "--n-train", "200",
           "--n-test", "8", "--jobs", "1", "--out", str(out), "--results", str(tmp_path / "results")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=CI_LIMIT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "results" / "quality.json").read_text())
    (run,) = results["runs"]
    assert run["method"] == "remask" and run["steps"] == 3 and run["n_test"] == 8
    assert results["base"]["steps"] == 2 and 0.0 <= results["base"]["accuracy"] <= 1.0
    assert 0.0 <= run["accuracy"] <= 1.0 and run["answer_nll"] > 0
    assert run["final_divergence"] is not None and set(run["curves"]) >= {"ce_full", "ce_masked", "divergence"}
    assert "algorithms.remask.weight=0.1" in run["train_command"]
    assert (tmp_path / "results" / "quality.png").stat().st_size > 10_000
    assert "| ReMask | 1 |" in (tmp_path / "results" / "quality.md").read_text()
