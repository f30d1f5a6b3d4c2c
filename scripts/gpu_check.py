"""One-call verification of the GPU path: loss paths, step benchmark, train + checkpoint + resume.

Run through ``scripts/gpu_check.sh`` (which installs the carried wheels first), or directly from the
repository root (it imports ``bench.step_bench``):

    python -m scripts.gpu_check --device cuda --out runs/gpu_check     # one H100/H200, a few minutes
    python -m scripts.gpu_check --device cpu --out /tmp/gpu_check      # the same steps, tiny shapes

1. ``loss_paths``: one ReMask step with the lean loss (``loss_impl='hidden'``) and with full logits
   (``'logits'``) from the same weights and batch, in amp_bf16 on CUDA (fp32 on CPU): totals and
   output-layer gradients agree, and each total equals ``(ce_full + ce_masked) / 2 + weight * div``.
2. ``step_bench``: ``bench/step_bench.py`` on StableLM-3B-4e1t's config (``bench/model_configs``) (random init) with
   amp_bf16 and FSDP: tokens/s, MFU (the passes the layout runs counted), peak memory for SFT, lean SFT, ReMask.
3. ``train_resume``: ``train.py`` on the 3B recipe with that config (``--train-layers`` decoder
   layers, default 8, so the checkpoint with Lilith's three moments stays ~14 GB on the machine's
   disk), FSDP, a corpus built from the packaged fixtures and the repo's tiny tokenizer: run A is
   the 10-batch run stopped after batch 5 with a checkpoint there; run B loads it and trains to
   10; run C trains 10 straight. A's and B's losses and B's final weights must equal C's.

Writes ONE JSON, ``OUT/gpu_check.json`` (every check's figures and ``ok``); exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

LOSS_LOG_PLUGIN = REPO / "scripts" / "gpu_check_plugin.py"


# ------------------------------------------------------------------------------------ loss paths

def check_loss_paths(device: str) -> dict:
    """Lean vs full-logits ReMask on one batch: same total and output-layer gradient; the loss identity."""
    from composer import Trainer
    from composer.core import Callback
    from torch.utils.data import DataLoader
    from transformers import StableLmForCausalLM

    from bench.step_bench import MASK_ID, make_batch, stablelm_config
    from composer_remask import ReMask
    from composer_remask.train.model import ComposerCausalLM

    class Capture(Callback):
        def __init__(self) -> None:
            self.loss: dict[str, float] = {}
            self.head_grad: torch.Tensor | None = None

        def after_loss(self, state, logger) -> None:
            self.loss = {k: float(v) for k, v in state.loss.items()}

        def after_backward(self, state, logger) -> None:
            self.head_grad = state.model.model.lm_head.weight.grad.detach().float().cpu().clone()

    bf16 = device == "cuda"
    config = stablelm_config("small" if bf16 else "tiny")
    batch = make_batch(8 if bf16 else 2, 256 if bf16 else 64, seed=1)
    weight = 0.1
    results = {}
    for impl in ("hidden", "logits"):
        torch.manual_seed(0)
        model = ComposerCausalLM(StableLmForCausalLM(config), tokenizer=None, train_metrics=False)
        capture = Capture()
        trainer = Trainer(model=model, train_dataloader=DataLoader([batch], batch_size=None), max_duration="1ba",
                          optimizers=torch.optim.SGD(model.parameters(), lr=0.0), device=device,
                          precision="amp_bf16" if bf16 else "fp32", progress_bar=False, seed=0, callbacks=[capture],
                          device_train_microbatch_size=int(batch["input_ids"].shape[0]),
                          algorithms=[ReMask(mask_prob=0.4, weight=weight, mask_token_id=MASK_ID, seed=0,
                                             loss_impl=impl, rationale_label_drop_prob=0.0, answer_only_prob=0.0)])
        trainer.fit()
        trainer.close()
        loss = capture.loss
        identity = 0.5 * (loss["ce_full"] + loss["ce_masked"]) + weight * loss["divergence"]
        results[impl] = {"loss": loss, "identity_abs_err": abs(loss["total"] - identity),
                         "head_grad": capture.head_grad}
    lean, full = results["hidden"], results["logits"]
    cosine = float(torch.nn.functional.cosine_similarity(lean["head_grad"].flatten(), full["head_grad"].flatten(),
                                                         dim=0))
    rel_grad = float((lean["head_grad"] - full["head_grad"]).norm() / full["head_grad"].norm())
    total_rel = abs(lean["loss"]["total"] - full["loss"]["total"]) / abs(full["loss"]["total"])
    tol = {"total_rel": 2e-2, "grad_rel": 5e-2, "identity": 1e-3} if bf16 else \
          {"total_rel": 1e-5, "grad_rel": 1e-4, "identity": 1e-5}
    ok = (total_rel <= tol["total_rel"] and rel_grad <= tol["grad_rel"]
          and max(lean["identity_abs_err"], full["identity_abs_err"]) <= tol["identity"])
    return {"ok": ok, "precision": "amp_bf16" if bf16 else "fp32", "layers": config.num_hidden_layers,
            "lean": lean["loss"], "logits": full["loss"], "total_rel_diff": total_rel,
            "head_grad_rel_diff": rel_grad, "head_grad_cosine": cosine,
            "identity_abs_err": {"lean": lean["identity_abs_err"], "logits": full["identity_abs_err"]},
            "tolerances": tol}


# ------------------------------------------------------------------------------------ step bench

def check_step_bench(device: str, out: Path) -> dict:
    from bench import step_bench

    if device == "cuda":
        argv = ["--device", "cuda", "--fsdp", "--model", "3b", "--batch", "16", "--seq", "256", "--steps", "3",
                "--warmup", "1", "--methods", "sft", "lean_sft", "remask"]
    else:
        argv = ["--device", "cpu", "--model", "tiny", "--batch", "2", "--seq", "64", "--steps", "1", "--warmup", "0",
                "--methods", "sft", "lean_sft", "remask", "--no-memory"]
    args = step_bench.parse_args(argv + ["--json", str(out / "step_bench.json")])
    result = step_bench.run(args)
    ok = all(math.isfinite(v) and v > 0 for v in result["median_step_s"].values())
    return {"ok": ok, "argv": argv, **result}


# ---------------------------------------------------------------------------------- train/resume

def build_corpus(root: Path) -> Path:
    """A small MDS corpus from the packaged fixtures and the repo's tiny tokenizer (no download)."""
    from composer_remask.data.sources import parse_source_arg
    from composer_remask.data.writer import build_corpus as write_corpus
    from composer_remask.tools.fixtures import write_source_fixtures

    raw = write_source_fixtures(root / "raw", rows=64, seed=0)
    corpus = root / "corpus"
    write_corpus([parse_source_arg(f"{name}={raw[name]}") for name in ("tinycot", "oasst2", "reddit")],
                 str(REPO / "assets" / "tiny-tokenizer"), str(corpus), progress=False)
    return corpus


def train_overrides(device: str, corpus: Path, layers: int) -> tuple[Path, list[str]]:
    common = [f"variables.data_dir={corpus}", f"tokenizer.name={REPO / 'assets' / 'tiny-tokenizer'}",
              "train_loader.num_workers=0", "train_loader.num_canonical_nodes=1", "progress_bar=false",
              "autoresume=false", "export_folder=null", "eval_first=false", f"code_paths=[{LOSS_LOG_PLUGIN}]",
              "loggers={gpu_check_log: {}}", "console_log_interval=1ba"]
    if device == "cuda":
        from bench.step_bench import MODEL_CONFIGS

        return REPO / "yamls" / "remask_3b.yaml", common + [
            "model.pretrained=false", f"model.pretrained_model_name_or_path={MODEL_CONFIGS / 'stablelm-3b-4e1t'}",
            f"model.config_overrides={{num_hidden_layers: {layers}}}", "global_train_batch_size=16",
            "device_train_microbatch_size=8"]
    return REPO / "yamls" / "tiny_cpu.yaml", common + [
        "~eval_loader", "global_train_batch_size=4", "device_train_microbatch_size=2"]


def run_train(recipe: Path, overrides: list[str], log: Path, stop_at: int = 0) -> list[dict]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]), "GPU_CHECK_LOSS_LOG": str(log),
           "GPU_CHECK_STOP_AT": str(stop_at)}
    command = [sys.executable, str(REPO / "train.py"), str(recipe), *overrides]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"train.py failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-4000:]}")
    return [json.loads(line) for line in log.read_text().splitlines()]


def check_train_resume(device: str, out: Path, layers: int) -> dict:
    work = out / "train_resume"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    corpus = build_corpus(work)
    recipe, overrides = train_overrides(device, corpus, layers)
    half, full = (5, 10) if device == "cuda" else (2, 4)
    checkpoints = work / "checkpoints"
    # A: the 10-batch run, stopped after batch 5 (same schedule as C) with a checkpoint there.
    a = run_train(recipe, overrides + [f"max_duration={full}ba", f"save_folder={checkpoints}",
                                       f"save_interval={half}ba", "save_num_checkpoints_to_keep=1",
                                       "run_name=gpu-check-a"], work / "a.jsonl", stop_at=half)
    saved = sorted(checkpoints.glob("*.pt")) or sorted(p for p in checkpoints.iterdir() if p.is_dir())
    if not saved:
        raise RuntimeError(f"run A saved no checkpoint under {checkpoints}")
    checkpoint_bytes = sum(f.stat().st_size for f in checkpoints.rglob("*") if f.is_file())
    b = run_train(recipe, overrides + [f"max_duration={full}ba", "save_folder=null", f"load_path={saved[-1]}",
                                       "run_name=gpu-check-b"], work / "b.jsonl")
    c = run_train(recipe, overrides + [f"max_duration={full}ba", "save_folder=null", "run_name=gpu-check-c"],
                  work / "c.jsonl")
    shutil.rmtree(checkpoints, ignore_errors=True)  # ~14 GB on the GPU machine

    def losses(rows: list[dict]) -> dict[int, float]:
        return {r["batch"]: r["loss"] for r in rows if "loss" in r}

    def weights(rows: list[dict]) -> dict:
        return next(r["weights"] for r in rows if "weights" in r)

    resumed, straight = losses(b), losses(c)
    tail = list(range(half, full))  # logged batch indices start at 0
    loss_diff = max(abs(resumed[i] - straight[i]) for i in tail)
    wb, wc = weights(b), weights(c)
    weight_rel = max(abs(b_stat - c_stat) / max(abs(c_stat), 1e-12)
                     for k in wc for b_stat, c_stat in zip(wb[k], wc[k]))  # [sum, sum of squares] per tensor
    # CPU runs are bitwise reproducible; CUDA kernels with atomics (embedding backward) are not quite.
    loss_tol, weight_tol = (2e-3, 1e-4) if device == "cuda" else (1e-6, 1e-9)
    a_matches = all(abs(v - straight[i]) <= loss_tol * max(1.0, abs(v)) for i, v in losses(a).items())
    ok = (sorted(resumed) == tail and sorted(losses(a)) == list(range(half)) and a_matches
          and loss_diff <= loss_tol * max(1.0, max(abs(v) for v in straight.values()))
          and weight_rel <= weight_tol and all(math.isfinite(v) for v in straight.values()))
    return {"ok": ok, "recipe": str(recipe.relative_to(REPO)), "overrides": overrides, "layers": layers,
            "batches": full, "checkpoint_at": half, "checkpoint_bytes": checkpoint_bytes,
            "losses_a": losses(a), "a_matches_straight": a_matches,
            "losses_resumed": resumed, "losses_straight": straight, "tolerances": [loss_tol, weight_tol],
            "max_loss_diff": loss_diff, "weights_max_rel_diff": weight_rel, "wall_s": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------ main

def environment() -> dict:
    import composer
    import streaming
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "composer": composer.__version__,
            "transformers": transformers.__version__, "streaming": streaming.__version__,
            "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg())}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(), gpu_count=torch.cuda.device_count(),
                    cuda=torch.version.cuda, gpu_memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(REPO / "runs" / "gpu_check"))
    parser.add_argument("--train-layers", type=int, default=8, help="CUDA: decoder layers of the train/resume model")
    parser.add_argument("--only", nargs="+", choices=["loss_paths", "step_bench", "train_resume"], default=None)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible (use --device cpu for the dry run)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"device": args.device, "environment": environment(), "checks": {}}
    started = time.perf_counter()
    checks = {"loss_paths": lambda: check_loss_paths(args.device),
              "step_bench": lambda: check_step_bench(args.device, out),
              "train_resume": lambda: check_train_resume(args.device, out, args.train_layers)}
    for name, check in checks.items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            result = check()
        except Exception as error:  # record and go on: one JSON with every check's outcome
            result = {"ok": False, "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
        result["wall_s"] = time.perf_counter() - t0
        report["checks"][name] = result
        print(json.dumps({name: {k: v for k, v in result.items() if k != "traceback"}}, default=str)[:2000],
              flush=True)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    report["wall_s"] = time.perf_counter() - started
    report["ok"] = all(c.get("ok") for c in report["checks"].values()) and bool(report["checks"])
    path = out / "gpu_check.json"
    tmp = path.with_suffix(".json.tmp")  # never a half-written report under the final name
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(path)
    print(f"{'OK' if report['ok'] else 'FAILED'}: {path} ({report['wall_s']:.0f} s)", flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
