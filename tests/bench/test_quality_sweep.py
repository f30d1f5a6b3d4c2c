"""The multi-epoch quality regime's pieces: the per-epoch evaluator on a real tiny model, choosing on
the validation split, and the report (table + plot) on made-up run records. The sweep itself
(`python -m bench.quality --regime epochs --quick`) trains several models and takes minutes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from bench import quality
from bench.quality_task import sweep
from bench.quality_task.epoch_eval import evaluate_rows
from bench.quality_task.generate import write_splits
from tests.helpers.assets import REPO


def test_validation_split_is_disjoint_and_keeps_the_old_splits(tmp_path: Path) -> None:
    meta = write_splits(tmp_path / "a", 200, 50, seed=3, n_val=40)
    assert (meta["train"], meta["test"], meta["val"]) == (200, 50, 40)
    prompts = {name: {json.loads(line)["prompt"] for line in (tmp_path / "a" / f"{name}.jsonl").read_text().splitlines()}
               for name in ("train", "val", "test")}
    assert not (prompts["train"] & prompts["val"]) and not (prompts["val"] & prompts["test"])
    assert not (prompts["train"] & prompts["test"])
    write_splits(tmp_path / "b", 200, 50, seed=3)   # without --val nothing changes for earlier benchmarks
    assert (tmp_path / "b" / "test.jsonl").read_text() == (tmp_path / "a" / "test.jsonl").read_text()
    assert not (tmp_path / "b" / "val.jsonl").exists()


class _Echo(torch.nn.Module):
    """A 'model' whose greedy continuation is a fixed text: checks the evaluator's bookkeeping."""

    def __init__(self, tokenizer, answers: dict[str, str]) -> None:
        super().__init__()
        self.tokenizer, self.answers = tokenizer, answers
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, attention_mask, max_new_tokens, **_):
        rows = []
        for ids in input_ids:
            text = self.tokenizer.decode([i for i in ids.tolist() if i != self.tokenizer.pad_token_id])
            continuation = next(v for k, v in self.answers.items() if k in text)
            new = self.tokenizer.encode(continuation, add_special_tokens=False)[:max_new_tokens]
            rows.append(ids.tolist() + new)
        width = max(map(len, rows))
        pad = self.tokenizer.pad_token_id
        return torch.tensor([r + [pad] * (width - len(r)) for r in rows])

    def forward(self, input_ids, attention_mask):
        # Teacher forcing: predict every next token right (one-hot logits on the shifted ids).
        vocab = len(self.tokenizer)
        shifted = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1)
        return type("Out", (), {"logits": torch.nn.functional.one_hot(shifted, vocab).float()})()


def test_evaluator_scores_strict_match_by_length(tiny_tokenizer) -> None:
    rows = [{"prompt": "Start with 2. Add 3. What is the result?", "rationale": "2 + 3 = 5.", "target": "5"},
            {"prompt": "Start with 4. Add 1, then multiply by 2. What is the result?",
             "rationale": "4 + 1 = 5. 5 * 2 = 10.", "target": "10"}]
    model = _Echo(tiny_tokenizer, {"Start with 2.": "2 + 3 = 5.\n<|answer|>\n5",
                                   "Start with 4.": "4 + 1 = 5. 5 * 2 = 11.\n<|answer|>\n11"})
    result = evaluate_rows(model, tiny_tokenizer, rows, batch_size=1)
    assert result["accuracy"] == 0.5 and result["accuracy_by_length"] == {"1": 1.0, "2": 0.0}
    assert result["step_acc_teacher_forced"] == 1.0 and result["predicted_by_length"]["2"] == 1.0


def test_evaluator_runs_on_a_real_model(tiny_tokenizer, tiny_model_factory, tmp_path: Path) -> None:
    write_splits(tmp_path, 4, 6, seed=0)
    rows = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    model = tiny_model_factory(seed=1)
    result = evaluate_rows(model, tiny_tokenizer, rows, max_new_tokens=8, batch_size=4)
    assert result["n"] == 6 and 0.0 <= result["step_acc_teacher_forced"] <= 1.0
    assert sum(result["count_by_length"].values()) == 6
    assert model.training is False or model.training is True  # restored, whatever it was


def _record(cell: str, seed: int, val: list[float], test: list[float]) -> dict:
    epochs = [{"epoch": ep, "val": {"accuracy": v, "accuracy_flexible": v, "accuracy_by_length": {"2": v},
                                    "step_acc_teacher_forced": 0.9, "predicted_by_length": {"2": 0.81}},
               "test": {"accuracy": t, "accuracy_flexible": t, "accuracy_by_length": {"2": t, "3": t / 2},
                        "step_acc_teacher_forced": 0.9, "predicted_by_length": {"2": 0.81, "3": 0.729}}}
              for ep, (v, t) in enumerate(zip(val, test))]
    chosen = sweep.val_chosen(epochs)
    c = sweep.CELLS[cell]
    return {"cell": cell, "label": c.label, "method": c.method, "seed": seed, "epochs": epochs,
            "test_final": test[-1], "val_final": val[-1], "val_chosen_epoch": chosen["epoch"],
            "val_at_chosen": chosen["val"]["accuracy"], "test_at_chosen": chosen["test"]["accuracy"],
            "test_peak": max(test), "test_peak_epoch": test.index(max(test)),
            "test_by_length_final": {"2": test[-1], "3": test[-1] / 2}, "step_acc_teacher_forced_final": 0.9,
            "final_ce": 0.1, "final_divergence": None if c.weight == 0 else 0.5, "train_seconds": 10.0}


def test_choices_use_validation_only_and_report_renders(tmp_path: Path) -> None:
    # SFT peaks at epoch 1 and falls; ReMask keeps rising. The test rows disagree with the
    # validation rows on purpose: the choice must follow validation.
    runs = [_record("sft", s, [0.1, 0.6, 0.4], [0.1, 0.9, 0.3]) for s in (0, 1)]
    runs += [_record("remask-p0.4-w0.1", s, [0.1, 0.5, 0.7], [0.1, 0.4, 0.5]) for s in (0, 1)]
    assert runs[0]["val_chosen_epoch"] == 1 and runs[2]["val_chosen_epoch"] == 2
    flexible_first = [{"epoch": 1, "val": {"accuracy": 0.5, "accuracy_flexible": 0.1}},
                      {"epoch": 2, "val": {"accuracy": 0.2, "accuracy_flexible": 0.6}}]
    assert sweep.val_chosen(flexible_first)["epoch"] == 1
    assert sweep.val_chosen(flexible_first, "accuracy_flexible")["epoch"] == 2
    summary = sweep.summarize(runs)
    assert sweep.best_cell(summary) == "remask-p0.4-w0.1"
    assert summary["sft"]["test_by_epoch"]["1"] == (0.9, 0.0)
    settings = {"mode": "test", "label": "PILOT", "base": "tiny", "base_steps": 1, "base_n_train": 1, "epochs": 2,
                "n_train": 8, "steps": "2-3", "batch": 4, "lr": 1e-3, "seeds": [0, 1], "n_val": 4, "n_test": 4,
                "device": "cpu", "jobs": 1, "threads": 1, "wall_seconds": 60, "machine": "test",
                "command": "python bench/quality.py --regime epochs --test"}
    text = sweep.report({"settings": settings, "summary": summary, "base": {}, "runs": runs}, tmp_path)
    assert "**PILOT**" in text and "ReMask p=0.4 w=0.1 sym_kl **(best on val)**" in text
    assert "| SFT | 2 | 30.0 ± 0.0 | 90.0 ± 0.0 |" in text
    assert (tmp_path / "quality_epochs.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "quality_epochs.json").read_text())["runs"][0]["cell"] == "sft"


def test_a_grid_report_is_rebuilt_from_its_committed_records_alone(tmp_path: Path) -> None:
    """``--report-only`` on a grid folder: settings, the pilot and one record per finished run are all
    it reads; each method gets its paired difference against SFT, table and plot included."""
    sft_correct = {0: [1, 1, 0, 0, 1, 0, 1, 0, 1, 0], 1: [0, 1, 1, 0, 1, 0, 0, 1, 1, 0]}
    runs = []
    for seed, rows in sft_correct.items():
        fixed = list(rows)
        for i in [i for i, ok in enumerate(rows) if not ok][:2]:   # ReMask fixes two misses per seed
            fixed[i] = 1
        for cell, correct in (("sft", rows), ("remask-p0.4-w0.1", fixed)):
            accuracy = sum(correct) / len(correct)
            record = _record(cell, seed, [0.1, 0.5, 0.6], [0.1, accuracy - 0.1, accuracy])
            runs.append({**record, "test_final_correct": correct, "test_at_chosen_correct": correct,
                         "run_seconds": 30.0})
    (tmp_path / "runs").mkdir()
    for record in runs:
        (tmp_path / "runs" / f"{record['cell']}-s{record['seed']}.json").write_text(json.dumps(record))
    settings = {"mode": "test", "base": "tiny", "base_steps": 1, "base_n_train": 1, "epochs": 2, "n_train": 8,
                "steps": "2-3", "batch": 4, "lr": 1e-3, "seeds": [0, 1, 2], "cells": ["sft", "remask-p0.4-w0.1"],
                "n_val": 4, "n_test": 10, "device": "cpu", "jobs": 1, "threads": 1, "wall_seconds": 60,
                "machine": "test", "command": "python -m bench.quality --grid test"}
    (tmp_path / "settings.json").write_text(json.dumps(settings))

    assert quality.main(["--grid", "smollm2-135m-cpu", "--report-only", "--results", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "quality_epochs.json").read_text())
    paired = results["summary"]["remask-p0.4-w0.1"]["paired"]["test_final_correct"]
    assert paired["diff_vs_sft"] == pytest.approx(0.2) and paired["seeds"] == [0, 1] and paired["n_problems"] == 10
    assert "paired" not in results["summary"]["sft"]
    assert (results["settings"]["runs_finished"], results["settings"]["runs_planned"]) == (4, 6)
    text = (tmp_path / "quality_epochs.md").read_text()
    assert "## Each method minus SFT" in text and "| ReMask p=0.4 w=0.1 sym_kl | [0, 1] | +20.0 |" in text
    assert (tmp_path / "quality_epochs.png").stat().st_size > 10_000


def test_cells_differ_only_in_the_algorithm_switch(tmp_path: Path) -> None:
    regime = sweep.REGIMES["full"]
    base = {"hf": str(tmp_path / "base" / "hf"), "tokenizer": "assets/tiny-tokenizer"}
    commands = {name: sweep.train_command(regime, cell, 0, tmp_path / "run", tmp_path / "data", tmp_path, base, "cpu")
                for name, cell in sweep.CELLS.items()}
    differing = {name: sorted(set(cmd) - set(commands["sft"])) for name, cmd in commands.items()}
    for name, extra in differing.items():
        assert all(a.startswith(("algorithms.remask.", "run_name=")) for a in extra), (name, extra)
    assert "algorithms.remask.divergence=forward_kl" in commands["remask-p0.4-w0.1-fkl"]
    assert "max_duration=8ep" in commands["sft"]


@pytest.mark.parametrize("name", ["quick", "full", "smollm2-135m", "smollm2-135m-cpu", "smollm2-135m-gpu"])
def test_regimes_have_enough_seeds_and_known_cells(name: str) -> None:
    regime = sweep.REGIMES[name]
    assert set(regime.cells) <= set(sweep.CELLS)
    assert name == "quick" or len(regime.seeds) >= 3


def test_collect_rebuilds_the_report_from_run_folders(tmp_path: Path) -> None:
    def evaluation(epoch: int, acc: float, flexible: float, with_flexible_by_length: bool) -> dict:
        split = {"accuracy": acc, "accuracy_flexible": flexible, "accuracy_by_length": {"2": acc},
                 "step_acc_teacher_forced": 0.5, "predicted_by_length": {"2": 0.25}, "examples": []}
        if with_flexible_by_length:
            split["accuracy_flexible_by_length"] = {"2": flexible}
        return {"epoch": epoch, "val": split, "test": split}

    folders = []
    for name, flexible_by_length in (("sft-s0", False), ("remask-p0.4-w0.1-s0", True)):
        run_dir = tmp_path / "runs" / name
        run_dir.mkdir(parents=True)
        (run_dir / "epochs.jsonl").write_text("\n".join(json.dumps(evaluation(ep, 0.0, 0.1 * ep, flexible_by_length))
                                                        for ep in range(3)) + "\n")
        (run_dir / "train_log.txt").write_text("[metric][batch=0]: loss/train/ce_full: 1.5\n")
        (run_dir / "record.json").write_text(json.dumps({"train_seconds": 12.0, "train_command": "train.py ..."}))
        folders.append(run_dir)
    regime = sweep.REGIMES["smollm2-135m"]
    assert sweep.collect(regime, folders, results_dir=tmp_path / "out", device="cpu", command="collect", label="PILOT") == 0
    results = json.loads((tmp_path / "out" / "quality_epochs.json").read_text())
    assert [r["cell"] for r in results["runs"]] == ["sft", "remask-p0.4-w0.1"]
    assert all(r["metric"] == "accuracy_flexible" and r["test_final"] == pytest.approx(0.2) for r in results["runs"])
    assert {r["by_length_metric"] for r in results["runs"]} == {"accuracy"}   # one metric for every run
    with pytest.raises(ValueError, match="not a finished run folder"):
        sweep.collect(regime, [tmp_path / "runs"], results_dir=tmp_path / "bad", device="cpu", command="x")


@pytest.mark.parametrize("argv, message", [
    (["--regime", "epochs", "--ops", "6-2"], "--ops '6-2'"),
    (["--regime", "epochs", "--base-data", "words:1-3:0"], "--base-data 'words:1-3:0'"),
    (["--regime", "epochs", "--base-data", "prose:1-3"], "--base-data 'prose:1-3'"),
    (["--base", "smollm2-135m", "--base-data", "words:1-3"], "--base-data 'words:1-3'"),
    (["--base-data", "words:1-3"], "--base-data belongs to the multi-epoch regime"),
])
def test_sweep_options_are_checked_before_anything_runs(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        quality.main(argv + ["--out", "/nonexistent/never-written"])
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_the_tiny_base_is_plain_sft(tmp_path: Path) -> None:
    """The recipe's default is ReMask; the shared base every cell starts from must not be trained with it."""
    from composer_remask.train import load_config

    command = sweep.base_train_command(sweep.REGIMES["full"], tmp_path / "base")
    cfg = load_config(REPO / command[2], command[3:])
    assert (cfg.algorithms["remask"]["mask_prob"], cfg.algorithms["remask"]["weight"]) == (0.0, 0.0)


def test_paired_difference_is_the_mean_paired_gap_with_an_interval_around_it() -> None:
    rng = __import__("random").Random(0)
    sft = {s: [int(rng.random() < 0.5) for _ in range(400)] for s in (0, 1, 2)}
    # The method fixes exactly 40 of SFT's misses on every seed and breaks none: +10 points, paired.
    better = {s: list(rows) for s, rows in sft.items()}
    for rows in better.values():
        misses = [i for i, ok in enumerate(rows) if not ok][:40]
        for i in misses:
            rows[i] = 1
    records = [{"cell": "sft", "seed": s, "test_final_correct": rows} for s, rows in sft.items()]
    records += [{"cell": "remask-p0.4-w0.1", "seed": s, "test_final_correct": rows} for s, rows in better.items()]
    paired = sweep.paired_difference(records, "remask-p0.4-w0.1")
    assert paired["diff_vs_sft"] == pytest.approx(0.1) and paired["seeds"] == [0, 1, 2]
    low, high = paired["ci95"]
    assert 0 < low < 0.1 < high and paired["excludes_zero"]
    # The same method against itself: a difference of 0 whose interval is [0, 0]; SFT against a
    # coin-flip relabelling of itself: an interval that straddles 0.
    same = [dict(r, cell="mt-p0.4") for r in records if r["cell"] == "sft"]
    assert sweep.paired_difference(records + same, "mt-p0.4")["ci95"] == [0.0, 0.0]
    shuffled = [{"cell": "mt-paper-p0.4", "seed": s, "test_final_correct": rng.sample(rows, len(rows))}
                for s, rows in sft.items()]
    noisy = sweep.paired_difference(records + shuffled, "mt-paper-p0.4")
    assert noisy["ci95"][0] < 0 < noisy["ci95"][1] and not noisy["excludes_zero"]
    assert sweep.paired_difference(records, "remask-p0.4-w0.1-random") is None
    with pytest.raises(ValueError, match="different test sets"):
        sweep.paired_difference(records + [{"cell": "mt-p0.4", "seed": 0, "test_final_correct": [1, 0]}], "mt-p0.4")


def test_evaluation_lines_of_one_epoch_are_merged(tmp_path: Path) -> None:
    lines = [{"epoch": 0, "val": {"accuracy": 0.1}}, {"epoch": 1, "val": {"accuracy": 0.5}},
             {"epoch": 2, "val": {"accuracy": 0.3}}, {"epoch": 2, "test": {"accuracy": 0.2}},
             {"epoch": 1, "test": {"accuracy": 0.4}}]
    (tmp_path / "epochs.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    merged = sweep.read_epochs(tmp_path / "epochs.jsonl")
    assert [e["epoch"] for e in merged] == [0, 1, 2]
    assert merged[1] == {"epoch": 1, "val": {"accuracy": 0.5}, "test": {"accuracy": 0.4}}
    assert "test" not in merged[0]


def test_learning_rate_is_chosen_on_validation_the_smaller_on_ties() -> None:
    pilot = [{"lr": 3e-5, "val_at_chosen": 0.4}, {"lr": 1e-4, "val_at_chosen": 0.6}, {"lr": 3e-4, "val_at_chosen": 0.6}]
    assert sweep.choose_lr(pilot) == 1e-4


def test_the_pretrained_grid_is_powered_and_names_its_five_objectives() -> None:
    regime = sweep.REGIMES["smollm2-135m-cpu"]
    assert regime.n_test >= 500 and len(regime.seeds) >= 3 and regime.epochs == 6
    methods = {sweep.CELLS[name].method for name in regime.cells}
    assert methods == {"sft", "masked_thought", "no_divergence", "remask"}
    paper = sweep.CELLS["mt-paper-p0.4"]
    assert paper.masked_only and paper.mask_strategy == "random" and paper.weight == 0
    assert "algorithms.remask.masked_only=true" in paper.switches()


def test_the_gpu_grid_is_the_cpu_grid_with_more_seeds_and_test_problems() -> None:
    cpu, gpu = sweep.REGIMES["smollm2-135m-cpu"], sweep.REGIMES["smollm2-135m-gpu"]
    differing = {key for key, value in dataclasses.asdict(gpu).items() if dataclasses.asdict(cpu)[key] != value}
    assert differing == {"name", "seeds", "n_test"}
    assert len(gpu.seeds) > len(cpu.seeds) and gpu.n_test > cpu.n_test


def test_a_folder_of_another_grid_is_refused_before_anything_runs(tmp_path: Path, capsys) -> None:
    """Regression: a run's record is reused when its training command matches, and the command does not
    carry the test split's size: a larger test set started in the CPU grid's folders reused its runs."""
    committed = REPO / "bench" / "results" / "smollm2-135m-cpu" / "settings.json"
    settings = json.loads(committed.read_text())
    cpu = sweep.REGIMES["smollm2-135m-cpu"]
    assert sweep.grid_mismatch(settings, cpu, "cpu") is None   # the committed grid resumes from this code
    assert sweep.grid_mismatch(settings, dataclasses.replace(cpu, seeds=(0, 1, 2, 3)), "cpu") is None  # extends it
    by_hand = dataclasses.replace(cpu, lr_pilot=())   # `--lr`: the rate given, no pilot
    assert sweep.grid_mismatch(settings, dataclasses.replace(by_hand, lr=settings["lr"]), "cpu") is None
    assert "lr 3e-05 there, 0.0001 now" in sweep.grid_mismatch(settings, dataclasses.replace(by_hand, lr=1e-4), "cpu")
    assert "lr_pilot" in sweep.grid_mismatch(settings, dataclasses.replace(cpu, lr_pilot=(1e-4, 3e-4)), "cpu")
    results, out = tmp_path / "results", tmp_path / "work"
    results.mkdir()
    (results / "settings.json").write_text(committed.read_text())
    for regime, device, named in [(dataclasses.replace(cpu, n_test=2000), "cpu", "n_test 500 there, 2000 now"),
                                  (cpu, "cuda", "device 'cpu' there, 'cuda' now")]:
        code = sweep.run(regime, out=out, results_dir=results, device=device, jobs=1, threads=1, fresh=False,
                         command="test")
        error = capsys.readouterr().err
        assert code == 2 and str(results / "settings.json") in error and named in error
        assert not out.exists()
    (results / "settings.json").unlink()   # the work folder's own stamp is checked too
    out.mkdir()
    (out / "settings.json").write_text(committed.read_text())
    assert sweep.run(dataclasses.replace(cpu, n_test=2000), out=out, results_dir=results, device="cpu", jobs=1,
                     threads=1, fresh=False, command="test") == 2
    assert str(out / "settings.json") in capsys.readouterr().err and sorted(out.iterdir()) == [out / "settings.json"]


def test_test_split_is_scored_on_the_validation_chosen_and_the_last_weights(tiny_tokenizer, tmp_path: Path) -> None:
    """``test_at="val_best_and_last"`` inside composer.Trainer: validation every epoch, the test rows
    on exactly two sets of weights, and the model left with its last weights."""
    from composer import Callback, Trainer
    from torch.utils.data import DataLoader

    from bench.quality_task.epoch_eval import EpochEval
    from tests.helpers.synthetic import CoTDataset, collate
    from tests.helpers.training import build_model

    write_splits(tmp_path / "synth", 4, 6, seed=0, n_val=5)
    snapshots = {}

    class Snapshot(Callback):
        def epoch_end(self, state, logger) -> None:
            snapshots[int(state.timestamp.epoch)] = {k: v.detach().clone() for k, v in state.model.model.state_dict().items()}

    evaluator = EpochEval({"val": str(tmp_path / "synth" / "val.jsonl"), "test": str(tmp_path / "synth" / "test.jsonl")},
                          str(tmp_path / "epochs.jsonl"), max_new_tokens=6, batch_size=4, test_at="val_best_and_last")
    model = build_model(tiny_tokenizer)
    Trainer(model=model, train_dataloader=DataLoader(CoTDataset(tiny_tokenizer, 8), batch_size=4, collate_fn=collate),
            max_duration="3ep", callbacks=[Snapshot(), evaluator], device="cpu", progress_bar=False,
            optimizers=torch.optim.SGD(model.parameters(), lr=0.5)).fit()
    lines = [json.loads(line) for line in (tmp_path / "epochs.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines if "val" in line] == [0, 1, 2, 3]
    merged = sweep.read_epochs(tmp_path / "epochs.jsonl")
    chosen = sweep.val_chosen(merged)
    tested = sorted(line["epoch"] for line in lines if "test" in line)
    assert tested == sorted({chosen["epoch"], 3})
    assert all("test" not in line for line in lines if "val" in line)
    rows = [json.loads(line) for line in (tmp_path / "synth" / "test.jsonl").read_text().splitlines()]
    for epoch in tested:
        probe = build_model(tiny_tokenizer).model
        probe.load_state_dict(snapshots[epoch])
        expected = evaluate_rows(probe, tiny_tokenizer, rows, max_new_tokens=6, batch_size=4)
        got = next(line["test"] for line in lines if line["epoch"] == epoch and "test" in line)
        assert got["correct"] == expected["correct"] and got["examples"] == expected["examples"]
        assert got["step_acc_teacher_forced"] == expected["step_acc_teacher_forced"]
    first, last = (next(line["test"] for line in lines if line["epoch"] == e and "test" in line) for e in tested)
    assert len(tested) == 2 and first["examples"] != last["examples"]  # else the check above could not tell them apart
    final = model.model.state_dict()
    assert all(torch.equal(final[k], snapshots[3][k]) for k in final)


def test_generation_stops_once_the_answer_number_is_written(tiny_tokenizer) -> None:
    from bench.quality_task.epoch_eval import StopAfterAnswer

    prompt = tiny_tokenizer("Start with 2. Add 3.", add_special_tokens=False)["input_ids"]
    texts = ["2 + 3 = 5.\n<|answer|>\n5\n", "2 + 3 = 5.\n<|answer|>\n5", "2 + 3 = 5. 5 + 1 = 6.",
             "<|answer|>\n-12 and more"]
    rows = [prompt + tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, rows))
    pad = tiny_tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    done = StopAfterAnswer(tiny_tokenizer, len(prompt))(ids, torch.zeros(1))
    # Row 1 is padded after "5" (finished): the pad token is not a digit, so the number is complete.
    assert done.tolist() == [True, True, False, True]
    unpadded = torch.tensor([rows[1]])
    assert StopAfterAnswer(tiny_tokenizer, len(prompt))(unpadded, torch.zeros(1)).tolist() == [False]
