"""Quality benchmark: SFT vs Masked Thought vs ReMask through the project's real pipeline, with seeds.

Every step is a subprocess, the way a user would run it:

1. ``python -m bench.quality_task.generate``: synthetic chained arithmetic in TinyCoT's shape
   (``prompt``, ``rationale``, ``target``, ``source``), disjoint train / held-out test splits
   (once; every run sees the same data);
2. ``remask-data build --source synth=tinycot:train.jsonl`` -> MDS (once);
3. the shared base: ``python train.py yamls/quality_tiny.yaml`` with the SFT switch from random
   init (once), exported as a Hugging Face folder. A model this small trained from scratch sits on a
   plateau for a seed-dependent number of steps before it learns the arithmetic, so comparing runs
   from scratch mostly measures when each escaped it (seen with 3-4-step problems after 1000 steps:
   52% vs 9% accuracy for two SFT seeds). Like the card's runs, which all fine-tune StableLM-3B,
   every method here fine-tunes the same base;
4. per method and seed: ``python train.py yamls/quality_tiny.yaml model.pretrained=true
   model.pretrained_model_name_or_path=<base> ...`` with the method's switch
   (``algorithms.remask.*``), the run's seed (data order, masks), and the same steps, batch, lr and
   data for all three; the recipe exports a Hugging Face folder at the end;
5. ``python -m bench.quality_task.lm_eval_task``: lm-evaluation-harness on local tasks over the
   held-out rows: greedy generation, GSM8K-style strict match on the number after ``<|answer|>``;
   teacher-forced log-likelihoods of the gold response given the prompt, and of the gold answer
   given prompt + gold rationale.

Methods (ReMask-CoT label rules, rationale label drop 0.1 and answer-only 0.1, apply to all three,
as in yamls/sft_3b.yaml; the card's values otherwise):

    sft             mask_prob 0   weight 0     one pass
    masked_thought  mask_prob 0.4 weight 0     two passes, no consistency term
    remask          mask_prob 0.4 weight 0.1   two passes + symmetric KL

Outputs (``--results``): ``quality.json`` (every run: method, seed, accuracy, log-likelihood
metrics, final CE / divergence, training curves, wall times, commands; the base), ``quality.md``
(mean ± std per method and every run) and ``quality.png`` (accuracy and gold-response NLL per method
with per-seed points; CE and divergence curves).

    python -m bench.quality --quick          # 1 seed, a few steps: a smoke test (a few minutes)
    python -m bench.quality                  # the full grid, 5 seeds (about an hour on 2 CPU cores)
    python -m bench.quality --device cuda    # training and evaluation on the GPU
    python -m bench.quality --report-only    # redo table and plot from quality.json

The multi-epoch regime (bench/quality_task/sweep.py: a small training set seen for several epochs,
a sweep of mask rate x weight x divergence with 3 seeds per cell, a validation split for choosing,
per-epoch held-out exact match and exposure-bias measures):

    python -m bench.quality --regime epochs --quick       # 3 cells x 1 seed, 2 epochs (minutes)
    python -m bench.quality --regime epochs               # 8 cells x 3 seeds (about an hour on 2 CPU cores)
    python -m bench.quality --base smollm2-135m --device cuda   # the pretrained base (~8 min on one H100/H200)

On CPU, runs go two at a time (``--jobs``) with one thread each (``--threads``): on a shared
2-core machine this is much faster than one run with two threads. Finished runs (and the base) are
reused when the script is started again with the same settings (``--fresh`` redoes them).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.quality_task.common import (
    REPO,
    format_mean_std,
    machine,
    mean_std,
    read_curves,
    repo_relative,
    run_all,
    run_logged,
    run_with_retry,
    smoothed_curves,
    subprocess_env,
    tail_mean,
    write_report,
)

RECIPE = "yamls/quality_tiny.yaml"
SCHEMA = 1

METHODS: dict[str, dict[str, Any]] = {
    "sft": {"label": "SFT", "mask_prob": 0.0, "weight": 0.0},
    "masked_thought": {"label": "Masked Thought", "mask_prob": 0.4, "weight": 0.0},
    "remask": {"label": "ReMask", "mask_prob": 0.4, "weight": 0.1},
}
COLORS = {"sft": "#4c72b0", "masked_thought": "#dd8452", "remask": "#55a868"}


@dataclasses.dataclass(frozen=True)
class Mode:
    """Everything that makes two benchmark runs comparable (recorded in quality.json)."""

    name: str
    seeds: tuple[int, ...]
    steps: int                 # fine-tuning steps per run (max_duration), the same for every method
    base_steps: int            # steps of the shared base model (SFT from random init), trained once
    batch: int                 # global_train_batch_size
    n_train: int               # generated training rows
    n_test: int                # held-out rows evaluated
    lr: float = 1.0e-3         # fine-tuning peak lr (the base uses the recipe's 2e-3)
    base_seed: int = 1000
    data_seed: int = 1234      # the data is the same for every run; the run's seed varies order and masks
    difficulty: tuple[tuple[str, int], ...] = ()   # generate.Difficulty overrides
    model: tuple[tuple[str, int], ...] = ()         # model.config overrides of the recipe
    extra: tuple[str, ...] = ()                     # further train.py overrides


MODES = {
    "quick": Mode("quick", seeds=(0,), steps=20, base_steps=30, batch=32, n_train=2000, n_test=100),
    "full": Mode("full", seeds=(0, 1, 2, 3, 4), steps=500, base_steps=1500, batch=32, n_train=20000, n_test=500),
}


# --------------------------------------------------------------------------------- data, base

def prepare_data(mode: Mode, out: Path, env: Mapping[str, str]) -> dict[str, Any]:
    """Generate the splits and build the MDS corpus once (reused when the settings match)."""
    synth, corpus = out / "synth", out / "corpus"
    gen_cmd = [sys.executable, "-m", "bench.quality_task.generate", repo_relative(synth), "--train", str(mode.n_train),
               "--test", str(mode.n_test), "--seed", str(mode.data_seed)]
    for key, value in mode.difficulty:
        gen_cmd += [f"--{key.replace('_', '-')}", str(value)]
    build_cmd = [str(Path(sys.executable).parent / "remask-data"), "build", "--tokenizer", "assets/tiny-tokenizer",
                 "--max-seq-len", "128", "--overwrite", "--no-progress",
                 "--source", f"synth=tinycot:{repo_relative(synth / 'train.jsonl')}", "--out", repo_relative(corpus)]
    stamp = out / "data.json"
    planned = {"generate": shlex.join(gen_cmd), "build": shlex.join(build_cmd)}
    if stamp.is_file() and json.loads(stamp.read_text()).get("commands") == planned \
            and (corpus / "manifest.json").is_file():
        return json.loads(stamp.read_text())
    seconds = run_logged(gen_cmd, out / "logs" / "generate.log", env)
    seconds += run_logged(build_cmd, out / "logs" / "build.log", env)
    manifest = json.loads((corpus / "manifest.json").read_text())
    info = {"commands": planned, "seconds": round(seconds, 1), "meta": json.loads((synth / "meta.json").read_text()),
            "tokens": manifest["sources"]["synth"]["tokens"]["total"],
            "rows_written": manifest["sources"]["synth"]["rows_written"]}
    stamp.write_text(json.dumps(info, indent=2) + "\n")
    return info


def train_command(mode: Mode, method: str, seed: int, run_dir: Path, data_dir: Path,
                  base_hf: Path | None) -> list[str]:
    """``train.py`` for one run; ``base_hf=None`` trains the shared base itself (SFT from random init)."""
    spec = METHODS[method]
    cmd = [sys.executable, "train.py", RECIPE,
           f"variables.data_dir={repo_relative(data_dir)}", f"variables.run_dir={repo_relative(run_dir)}",
           f"run_name=quality-{method if base_hf else 'base'}-s{seed}", f"seed={seed}",
           f"max_duration={mode.steps if base_hf else mode.base_steps}ba", f"global_train_batch_size={mode.batch}",
           f"device_train_microbatch_size={mode.batch}",
           f"algorithms.remask.mask_prob={spec['mask_prob']}", f"algorithms.remask.weight={spec['weight']}"]
    if base_hf is None:
        cmd += [f"model.config.{key}={value}" for key, value in mode.model]
    else:  # fine-tune the base's Hugging Face export, as the 3B recipes fine-tune StableLM
        cmd += ["model.pretrained=true", f"model.pretrained_model_name_or_path={repo_relative(base_hf)}", "model.config=null",
                f"optimizer.lr={mode.lr}", *mode.extra]
    return cmd


def eval_command(run_dir: Path, test_jsonl: Path, device: str, limit: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "bench.quality_task.lm_eval_task", repo_relative(run_dir / "hf"), "--test", repo_relative(test_jsonl),
           "--out", repo_relative(run_dir / "eval.json"), "--samples", repo_relative(run_dir / "samples.jsonl"), "--device", device]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    return cmd


def prepare_base(mode: Mode, out: Path, env: Mapping[str, str], device: str) -> dict[str, Any]:
    """Train the shared base (plain SFT from random init on the same training rows), export and evaluate it.

    Every method then fine-tunes this base, like the card's runs fine-tune StableLM-3B: the base has
    learned the template, the copying and the arithmetic facts, so the comparison is not decided by
    when (or whether) a run from scratch gets past its first plateau.
    """
    base_dir = out / "base"
    cmd = train_command(mode, "sft", mode.base_seed, base_dir, base_dir / "corpus", None)
    ev_cmd = eval_command(base_dir, out / "synth" / "test.jsonl", device, None)
    stamp = base_dir / "record.json"
    if stamp.is_file():
        old = json.loads(stamp.read_text())
        if old.get("train_command") == shlex.join(cmd) and old.get("eval_command") == shlex.join(ev_cmd) \
                and (base_dir / "hf" / "config.json").is_file():
            print(f"[base] reusing {repo_relative(stamp)}", flush=True)
            return old
    if base_dir.exists():
        shutil.rmtree(base_dir)
    base_dir.mkdir(parents=True)
    shutil.copytree(out / "corpus", base_dir / "corpus")
    print(f"[base] training: {shlex.join(cmd)}", flush=True)
    seconds = run_logged(cmd, base_dir / "train.log", env)
    shutil.rmtree(base_dir / "corpus", ignore_errors=True)
    eval_seconds = run_logged(ev_cmd, base_dir / "eval.log", env)
    evaluation = json.loads((base_dir / "eval.json").read_text())
    curves = read_curves(base_dir / "train_log.txt")
    record = {"method": "base", "label": "base (shared SFT start)", "seed": mode.base_seed,
              **{key: evaluation[key] for key in ("accuracy", "accuracy_flexible", "answer_nll",
                                                  "answer_teacher_forced_acc", "response_nll")},
              "n_test": evaluation["n"], "final_ce": tail_mean(curves.get("ce_full", [])),
              "steps": mode.base_steps, "train_seconds": round(seconds, 1), "eval_seconds": round(eval_seconds, 1),
              "train_command": shlex.join(cmd), "eval_command": shlex.join(ev_cmd),
              "curves": smoothed_curves(curves)}
    stamp.write_text(json.dumps(record, indent=2) + "\n")
    print(f"[base] accuracy {record['accuracy']:.3f}  answer NLL {record['answer_nll']:.3f}  "
          f"final CE {record['final_ce']:.4f}  ({seconds:.0f} s + {eval_seconds:.0f} s)", flush=True)
    return record


# ------------------------------------------------------------------------------------- one run

def run_one(mode: Mode, method: str, seed: int, out: Path, shared: Path, device: str,
            env: Mapping[str, str], fresh: bool, eval_limit: int | None) -> dict[str, Any]:
    """One fine-tuning run of ``method`` from the base under ``shared`` (data, corpus, base) in ``out``."""
    run_dir = out / "runs" / f"{method}-s{seed}"
    data_dir, test_jsonl = shared / "corpus", shared / "synth" / "test.jsonl"
    train_cmd = train_command(mode, method, seed, run_dir, run_dir / "corpus", shared / "base" / "hf")
    ev_cmd = eval_command(run_dir, test_jsonl, device, eval_limit)
    record_path = run_dir / "record.json"
    if not fresh and record_path.is_file():
        old = json.loads(record_path.read_text())
        if old.get("train_command") == shlex.join(train_cmd) and old.get("eval_command") == shlex.join(ev_cmd):
            print(f"[{method} seed {seed}] reusing {repo_relative(record_path)}", flush=True)
            return old
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    # A private copy of the corpus: StreamingDataset refuses a local folder another live job uses.
    shutil.copytree(data_dir, run_dir / "corpus")
    print(f"[{method} seed {seed}] training: {shlex.join(train_cmd)}", flush=True)
    train_seconds = run_with_retry(train_cmd, run_dir / "train.log", env)
    shutil.rmtree(run_dir / "corpus", ignore_errors=True)
    print(f"[{method} seed {seed}] trained in {train_seconds:.0f} s; evaluating", flush=True)
    eval_seconds = run_logged(ev_cmd, run_dir / "eval.log", env)
    evaluation = json.loads((run_dir / "eval.json").read_text())
    curves = read_curves(run_dir / "train_log.txt")
    ce = curves.get("ce_full", [])
    record = {
        "method": method, "label": METHODS[method]["label"], "seed": seed,
        "mask_prob": METHODS[method]["mask_prob"], "weight": METHODS[method]["weight"],
        "accuracy": evaluation["accuracy"], "accuracy_flexible": evaluation["accuracy_flexible"],
        "answer_nll": evaluation["answer_nll"], "answer_teacher_forced_acc": evaluation["answer_teacher_forced_acc"],
        "response_nll": evaluation["response_nll"], "n_test": evaluation["n"],
        "final_ce": tail_mean(ce), "final_ce_masked": tail_mean(curves.get("ce_masked", [])),
        "final_divergence": tail_mean(curves.get("divergence", [])), "final_loss": tail_mean(curves.get("total", [])),
        "steps": ce[-1][0] if ce else None,
        "train_seconds": round(train_seconds, 1), "eval_seconds": round(eval_seconds, 1),
        "train_command": shlex.join(train_cmd), "eval_command": shlex.join(ev_cmd),
        "curves": smoothed_curves(curves),
        "lm_eval": evaluation["lm_eval"],
    }
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"[{method} seed {seed}] accuracy {record['accuracy']:.3f}  answer NLL {record['answer_nll']:.3f}  "
          f"final CE {record['final_ce']:.4f}  ({train_seconds:.0f} s + {eval_seconds:.0f} s)", flush=True)
    return record


# ------------------------------------------------------------------------------------- report

def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method: number of runs and (mean, std) of each headline number (sample std over seeds)."""
    keys = ("accuracy", "accuracy_flexible", "response_nll", "answer_nll", "answer_teacher_forced_acc",
            "final_ce", "final_divergence", "train_seconds")
    summary: dict[str, dict[str, Any]] = {}
    for method in [m for m in METHODS if any(r["method"] == m for r in records)]:
        runs = [r for r in records if r["method"] == method]
        summary[method] = {"label": METHODS[method]["label"], "runs": len(runs),
                           **{key: mean_std([r.get(key) for r in runs]) for key in keys}}
    return summary


def format_table(summary: Mapping[str, Mapping[str, Any]]) -> str:
    lines = ["| method | runs | accuracy, strict (%) | accuracy, last number (%) | gold response NLL (nats) | "
             "answer NLL (nats) | answer greedy given gold rationale (%) | final CE | final divergence | "
             "train time (s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for entry in summary.values():
        lines.append(
            f"| {entry['label']} | {entry['runs']} | {format_mean_std(entry['accuracy'], 100)} | "
            f"{format_mean_std(entry['accuracy_flexible'], 100)} | {format_mean_std(entry['response_nll'], 1, 3)} | "
            f"{format_mean_std(entry['answer_nll'], 1, 4)} | "
            f"{format_mean_std(entry['answer_teacher_forced_acc'], 100)} | {format_mean_std(entry['final_ce'], 1, 4)} | "
            f"{format_mean_std(entry['final_divergence'], 1, 4)} | {format_mean_std(entry['train_seconds'], 1, 0)} |")
    return "\n".join(lines)


def format_runs(records: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| method | seed | accuracy (%) | gold response NLL | final CE | final divergence | train (s) | eval (s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in records:
        div = "–" if r.get("final_divergence") is None else f"{r['final_divergence']:.4f}"
        lines.append(f"| {r['label']} | {r['seed']} | {100 * r['accuracy']:.1f} | {r['response_nll']:.3f} | "
                     f"{r['final_ce']:.4f} | {div} | {r['train_seconds']:.0f} | {r['eval_seconds']:.0f} |")
    return "\n".join(lines)


def write_markdown(results: Mapping[str, Any], path: Path) -> str:
    summary = summarize(results["runs"])
    settings = results["settings"]
    base = results.get("base")
    base_line = [] if not base else [
        f"Shared base (plain SFT from random init, {settings.get('base_steps')} steps, seed {base['seed']}), "
        f"the start of every run: accuracy {100 * base['accuracy']:.1f}%, gold response NLL "
        f"{base['response_nll']:.3f}.", ""]
    text = "\n".join([
        f"# Quality benchmark ({settings['mode']} mode)",
        "",
        "SFT vs Masked Thought vs ReMask fine-tuning one shared tiny base model on synthetic chained arithmetic "
        "(bench/quality_task/generate.py) with `yamls/quality_tiny.yaml`, evaluated with "
        "lm-evaluation-harness on held-out problems. Mean ± sample std over seeds (the seed sets the data "
        "order and the masks).",
        "",
        format_table(summary),
        "",
        *base_line,
        "- accuracy, strict: greedy generation, the number after `<|answer|>` equals the target "
        "(GSM8K-style strict match); last number: GSM8K's flexible extract.",
        "- gold response NLL: negative log-likelihood of the gold rationale + `<|answer|>` + answer given "
        "the prompt (teacher forcing, lm-eval `loglikelihood`), nats per problem; lower is better. "
        "answer NLL / greedy: the same for the answer alone given prompt + gold rationale (saturates: "
        "the answer is the rationale's last number).",
        "- final CE / divergence: training CE on the unmasked sequence and the divergence term, mean of "
        "the last 10% of steps (Masked Thought computes the divergence too, with weight 0).",
        "",
        f"Settings: {settings['steps']} fine-tuning steps × batch {settings['batch']} (peak lr "
        f"{settings.get('lr')}, one-cycle cosine) for every method; "
        f"{settings['n_train']} training problems, {settings['n_test']} held-out; "
        f"difficulty {json.dumps(settings['difficulty'])}; model {settings['model']}; "
        f"device {settings['device']}, {settings['jobs']} run(s) at a time × {settings['threads']} thread(s); "
        f"grid wall time {settings.get('wall_seconds', 0) / 60:.1f} min on {settings['machine']}.",
        "",
        f"Command: `{settings['command']}`",
        "",
        "## Every run",
        "",
        format_runs(results["runs"]),
        "",
        "![quality](quality.png)",
        "",
    ])
    path.write_text(text, encoding="utf-8")
    return text


def plot(results: Mapping[str, Any], path: Path) -> None:
    """Accuracy and gold-response NLL per method (bars: mean, dots: seeds), CE / divergence curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = results["runs"]
    methods = [m for m in METHODS if any(r["method"] == m for r in records)]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, key, scale, title in ((axes[0][0], "accuracy", 100, "held-out accuracy, strict match (%)"),
                                  (axes[0][1], "response_nll", 1,
                                   "gold response NLL given the prompt (nats per problem)")):
        for x, method in enumerate(methods):
            values = [scale * r[key] for r in records if r["method"] == method]
            ax.bar(x, statistics.fmean(values), color=COLORS[method], alpha=0.55, width=0.6)
            if len(values) > 1:
                ax.errorbar(x, statistics.fmean(values), yerr=statistics.stdev(values), color="black", capsize=6)
            jitter = [x + 0.12 * (i - (len(values) - 1) / 2) for i in range(len(values))]
            ax.scatter(jitter, values, color="black", s=18, zorder=3)
        base = results.get("base")
        if base:
            ax.axhline(scale * base[key], color="gray", ls="--", lw=1, label="shared base (start)")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xticks(range(len(methods)), [METHODS[m]["label"] for m in methods])
        ax.set_ylim(bottom=0)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    for ax, key, title in ((axes[1][0], "ce_full", "training CE, unmasked sequence"),
                           (axes[1][1], "divergence", "training divergence (sym. KL, masked vs full)")):
        for method in methods:
            first = True
            for r in (r for r in records if r["method"] == method):
                points = [p for p in r.get("curves", {}).get(key) or [] if p[1] > 0]  # log scale
                if not points:
                    continue
                ax.plot([p[0] for p in points], [p[1] for p in points], color=COLORS[method], alpha=0.8, lw=1.2,
                        label=METHODS[method]["label"] if first else None)
                first = False
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    settings = results["settings"]
    fig.suptitle(f"composer-remask quality benchmark ({settings['mode']}): fine-tuning a shared base, "
                 f"{settings['steps']} steps × batch {settings['batch']}, seeds {settings['seeds']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results: Mapping[str, Any], results_dir: Path) -> str:
    """``quality.json``, ``quality.md`` and ``quality.png`` in ``results_dir``; the Markdown."""
    return write_report(results, results_dir, "quality", write_markdown, plot)


# --------------------------------------------------------------------------------------- main

def _mode_from_args(args: argparse.Namespace) -> Mode:
    mode = MODES["quick" if args.quick else "full"]
    changes: dict[str, Any] = {}
    if args.seeds:
        changes["seeds"] = tuple(int(s) for s in args.seeds.split(","))
    for key in ("steps", "base_steps", "batch", "n_train", "n_test", "lr"):
        if getattr(args, key) is not None:
            changes[key] = getattr(args, key)
    return dataclasses.replace(mode, **changes)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    command = "python -m bench.quality" + "".join(f" {shlex.quote(a)}" for a in
                                                  (argv if argv is not None else sys.argv[1:]))
    if args.regime == "epochs" or args.base != "tiny" or args.grid:
        return _main_epochs(args, parser, command)
    for option, value in (("--base-data", args.base_data), ("--ops", args.ops)):
        if value is not None:
            parser.error(f"{option} belongs to the multi-epoch regime (--regime epochs)")
    return _main_steps(args, parser, command)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, few steps, 100 test problems (smoke)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of %(default)s")
    parser.add_argument("--seeds", help="comma-separated training seeds (default: the mode's)")
    parser.add_argument("--steps", type=int, help="fine-tuning steps per run (default: the mode's)")
    parser.add_argument("--base-steps", type=int, help="steps of the shared base model (default: the mode's)")
    parser.add_argument("--lr", type=float, help="fine-tuning peak learning rate (default: the mode's)")
    parser.add_argument("--batch", type=int, help="global batch size (default: the mode's)")
    parser.add_argument("--n-train", type=int, help="generated training problems")
    parser.add_argument("--n-test", type=int, help="held-out problems evaluated")
    parser.add_argument("--mask-prob", type=float, default=None,
                        help="mask rate of Masked Thought and ReMask (default 0.4, the card's)")
    parser.add_argument("--weight", type=float, default=None, help="ReMask's divergence weight (default 0.1)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra train.py override for every fine-tuning run, e.g. "
                             "algorithms.remask.divergence=js (an ablation; recorded in the results)")
    parser.add_argument("--jobs", type=int, default=None, help="runs at a time (default: 2 on CPU, 1 on CUDA)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run on CPU")
    parser.add_argument("--out", default=None, help="work folder (default: runs/quality[-quick])")
    parser.add_argument("--results", default=None,
                        help="where quality.json/.md/.png go (default: bench/results, or the work folder with --quick)")
    parser.add_argument("--base-from", metavar="OUT",
                        help="reuse the data and shared base of an earlier grid's work folder (for ablations)")
    parser.add_argument("--fresh", action="store_true", help="redo runs that already have a record")
    parser.add_argument("--report-only", action="store_true", help="rebuild quality.md and quality.png from quality.json")
    epochs = parser.add_argument_group(
        "multi-epoch regime (--regime epochs): a small training set seen for several epochs, a sweep of "
        "cells (mask rate x weight x divergence), validation split for choosing; bench/quality_task/sweep.py")
    epochs.add_argument("--regime", choices=("steps", "epochs"), default="steps",
                        help="steps: the one-pass grid above (default); epochs: the multi-epoch sweep")
    epochs.add_argument("--base", default="tiny",
                        help="epochs regime: 'tiny' (trained here) or a remask-import-gguf name, e.g. smollm2-135m "
                             "(implies --regime epochs)")
    epochs.add_argument("--grid", help="a named grid of bench/quality_task/sweep.py (e.g. smollm2-135m-cpu: the "
                                       "powered comparison on the pretrained base); implies --regime epochs")
    epochs.add_argument("--cells", help="comma-separated sweep cells (default: the regime's)")
    epochs.add_argument("--epochs", type=int, help="fine-tuning epochs (default: the regime's)")
    epochs.add_argument("--n-val", type=int, help="validation problems")
    epochs.add_argument("--base-data", metavar="STYLE:OPS[:N]",
                        help="tiny base only: the N problems it is trained on, e.g. symbols:1-5:20000 (default) or "
                             "words:1-3:4000 (a base that already reads worded prompts)")
    epochs.add_argument("--ops", metavar="MIN-MAX",
                        help="operations per fine-tuning problem (default: the regime's, 2-6 on the tiny base)")
    epochs.add_argument("--label", default="", help="a line printed at the top of the results (e.g. 'PILOT ...')")
    epochs.add_argument("--collect", nargs="+", metavar="RUN_DIR",
                        help="rebuild the report from finished run folders (<cell>-s<seed>) instead of running")
    return parser


def _main_steps(args: argparse.Namespace, parser: argparse.ArgumentParser, command: str) -> int:
    """The one-pass regime: data and the shared base once, then every method x seed, then the report."""
    out = Path(args.out or ("runs/quality-quick" if args.quick else "runs/quality"))
    out = out if out.is_absolute() else REPO / out
    results_dir = Path(args.results) if args.results else (out if args.quick else REPO / "bench" / "results")
    if args.report_only:
        results = json.loads((results_dir / "quality.json").read_text())
        print(report(results, results_dir))
        return 0
    mode, methods = _mode_and_methods(args, parser)
    jobs = args.jobs or (2 if args.device == "cpu" else 1)
    threads = args.threads if args.device == "cpu" else max(args.threads, 4)
    env = subprocess_env(threads, args.device)

    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    from composer_remask.tools.shared_memory import clean_unused_streaming_shared_memory

    clean_unused_streaming_shared_memory()
    shared, data, base = _data_and_base(args, parser, mode, out, env)
    print(f"data: {data['rows_written']} training rows ({data['tokens']} tokens), "
          f"{mode.n_test} held-out, base accuracy {base['accuracy']:.3f} -> {repo_relative(shared)}", flush=True)

    # Interleave methods within each seed, so a grid cut short still compares like with like.
    failures: list[str] = []
    records = run_all(jobs, [(f"{method} seed {seed}",
                              functools.partial(run_one, mode, method, seed, out, shared, args.device, env, args.fresh,
                                                None))
                             for seed in mode.seeds for method in methods], failures)
    wall = time.monotonic() - started

    settings = {
        "schema": SCHEMA, "mode": mode.name, "command": command, "seeds": list(mode.seeds), "methods": methods,
        "steps": mode.steps, "base_steps": mode.base_steps, "lr": mode.lr, "base_seed": mode.base_seed,
        "batch": mode.batch, "n_train": mode.n_train, "n_test": mode.n_test,
        "data_seed": mode.data_seed, "difficulty": data["meta"]["difficulty"],
        "method_settings": {m: dict(METHODS[m]) for m in methods}, "extra_overrides": list(mode.extra),
        "model": _model_summary(mode), "recipe": RECIPE, "device": args.device, "jobs": jobs, "threads": threads,
        "wall_seconds": round(wall, 1), "data": data, "machine": machine(args.device),
    }
    results = {"settings": settings, "summary": summarize(records), "base": base, "runs": records}
    if records:
        print(report(results, results_dir))
        print(f"results: {repo_relative(results_dir)}/quality.json, quality.md, quality.png  "
              f"(grid wall time {wall / 60:.1f} min)")
    if failures:
        print("failed runs:\n" + "\n".join(failures), file=sys.stderr)
        return 1
    return 0


def _mode_and_methods(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[Mode, list[str]]:
    """The mode the options describe, and the methods to run (the method settings follow the options)."""
    mode = _mode_from_args(args)
    if args.set:
        mode = dataclasses.replace(mode, extra=tuple(args.set))
    if args.mask_prob is not None:
        for name in ("masked_thought", "remask"):
            METHODS[name]["mask_prob"] = args.mask_prob
    if args.weight is not None:
        METHODS["remask"]["weight"] = args.weight
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    return mode, methods


def _data_and_base(args: argparse.Namespace, parser: argparse.ArgumentParser, mode: Mode, out: Path,
                   env: Mapping[str, str]) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """The folder holding data and base, the data record and the base record: made in ``out``, or an
    earlier grid's (``--base-from``, for ablations)."""
    if args.base_from:  # an ablation: fine-tune the base of an earlier grid, on its data
        shared = Path(args.base_from) if Path(args.base_from).is_absolute() else REPO / args.base_from
        data = json.loads((shared / "data.json").read_text())
        base = json.loads((shared / "base" / "record.json").read_text())
        if not (shared / "base" / "hf" / "config.json").is_file():
            parser.error(f"--base-from {args.base_from}: no base export under it (run the grid there first)")
        return shared, data, base
    data = prepare_data(mode, out, env)
    if args.fresh and (out / "base").exists():
        shutil.rmtree(out / "base")
    return out, data, prepare_base(mode, out, env, args.device)


def _operations(text: str) -> bool:
    """Whether ``text`` is a range of operations the problem generator takes (``3`` or ``2-6``)."""
    from bench.quality_task.generate import parse_steps

    try:
        low, high = parse_steps(text)
    except argparse.ArgumentTypeError:
        return False
    return 1 <= low <= high


def _main_epochs(args: argparse.Namespace, parser: argparse.ArgumentParser, command: str) -> int:
    """``--regime epochs`` (or ``--base NAME``): the multi-epoch sweep of bench/quality_task/sweep.py."""
    from bench.quality_task import sweep

    regime = _epochs_regime(args, parser)
    suffix = f"-{args.grid}" if args.grid else "" if args.base == "tiny" else f"-{args.base}"
    out = Path(args.out or f"runs/quality-epochs{suffix}{'-quick' if args.quick else ''}")
    out = out if out.is_absolute() else REPO / out
    results_dir = Path(args.results) if args.results else (
        out if args.quick else REPO / "bench" / "results" / (args.grid or f"epochs{suffix}"))
    if args.report_only:
        if (results_dir / "settings.json").is_file():  # a grid that keeps one record per finished run
            print(sweep.report_from_records(results_dir))
            return 0
        results = json.loads((results_dir / "quality_epochs.json").read_text())
        print(sweep.report(results, results_dir))
        return 0
    if args.collect:
        return sweep.collect(regime, [Path(d) for d in args.collect], results_dir=results_dir, device=args.device,
                             command=command, label=args.label)
    jobs = args.jobs or (2 if args.device == "cpu" else 3)
    threads = args.threads if args.device == "cpu" else max(args.threads, 4)
    return sweep.run(regime, out=out, results_dir=results_dir, device=args.device, jobs=jobs, threads=threads,
                     fresh=args.fresh, command=command, label=args.label)


def _epochs_regime(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Any:
    """The sweep's regime: a named grid, a pretrained base's, or the tiny base's, changed by the options."""
    from bench.quality_task import sweep

    if args.grid:
        if args.grid not in sweep.REGIMES or args.base != "tiny":
            parser.error(f"--grid {args.grid!r}: known grids: {', '.join(sweep.REGIMES)} (--base comes with the grid)")
        regime = sweep.REGIMES[args.grid]
        if args.quick:  # a smoke test of the whole grid's path: every cell, one seed, tiny splits
            regime = dataclasses.replace(regime, name=f"{args.grid}-quick", seeds=(0,), epochs=1, n_train=32,
                                         n_val=8, n_test=8, lr_pilot=regime.lr_pilot[:2])
    elif args.base != "tiny":
        if args.base not in sweep.REGIMES:
            parser.error(f"--base {args.base!r}: known bases: tiny, {', '.join(r for r in sweep.REGIMES if r not in ('quick', 'full'))}")
        regime = sweep.REGIMES[args.base]
        if args.quick:
            regime = dataclasses.replace(regime, name=f"{args.base}-quick", seeds=(0,), epochs=1, n_train=32,
                                         n_val=16, n_test=16)
    else:
        regime = sweep.REGIMES["quick" if args.quick else "full"]
    changes: dict[str, Any] = {}
    if args.seeds:
        changes["seeds"] = tuple(int(s) for s in args.seeds.split(","))
    if args.cells:
        cells = tuple(c.strip() for c in args.cells.split(",") if c.strip())
        unknown = [c for c in cells if c not in sweep.CELLS]
        if unknown:
            parser.error(f"unknown cell(s) {unknown}; known: {', '.join(sweep.CELLS)}")
        changes["cells"] = cells
    if args.base_data is not None:
        parts = args.base_data.split(":")
        if args.base != "tiny" or len(parts) not in (2, 3) or parts[0] not in ("symbols", "words") \
                or not _operations(parts[1]) or (len(parts) == 3 and not (parts[2].isdigit() and int(parts[2]) > 0)):
            parser.error(f"--base-data {args.base_data!r}: expected symbols|words:MIN-MAX[:N] (N > 0), with the "
                         "tiny base")
        changes["base_data"] = f"{parts[0]}:{parts[1]}"
        if len(parts) == 3:
            changes["base_n_train"] = int(parts[2])
    if args.ops is not None:
        if not _operations(args.ops):
            parser.error(f"--ops {args.ops!r}: expected MIN-MAX operations, 1 <= MIN <= MAX")
        changes["steps"] = args.ops
    for key in ("epochs", "batch", "n_train", "n_val", "n_test", "lr", "base_steps"):
        if getattr(args, key) is not None:
            changes[key] = getattr(args, key)
    if args.lr is not None:
        changes["lr_pilot"] = ()   # a rate given by hand replaces the pilot that would choose it
    if args.set:
        changes["extra"] = tuple(args.set)
    return dataclasses.replace(regime, **changes)


def _model_summary(mode: Mode) -> str:
    from omegaconf import OmegaConf

    config = dict(OmegaConf.to_container(OmegaConf.load(REPO / RECIPE).model.config))
    config.update(dict(mode.model))
    return (f"StableLM-style, hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, "
            f"{config['num_attention_heads']} heads; the shared base starts from random init")


if __name__ == "__main__":
    sys.exit(main())
