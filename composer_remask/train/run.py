"""``composer train.py RECIPE.yaml [key=value ...]``: the whole training story, top to bottom.

1. read the recipe, fill in the arguments one section takes from another (``transforms.py``), and
   validate it (nothing heavy yet): every section, the algorithms, optimizer and
   schedule constructed once, the tokenizer, and the corpus manifest against the recipe;
2. data, model, optimizer, schedule, algorithms, callbacks, loggers;
3. ``Trainer.fit()`` with checkpoints and autoresume (unreadable checkpoints left by a crash are moved
   aside first; a folder of another recipe's run is refused and a finished run is left alone, see
   ``identity.py``; every checkpoint load is checked to be safe, see ``composer_remask/checkpoints.py``), stopped at the
   first non-finite loss;
4. export a Hugging Face folder and print a summary.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from composer import Trainer
from composer.utils import dist, reproducibility

from composer_remask.checkpoints import CheckpointError, install_safe_loading, recover_save_folder
from composer_remask.export import export_model
from composer_remask.train.builders import (
    build_batch_sizes,
    build_callbacks,
    build_loaders,
    build_loggers,
    build_model,
    build_optimizer,
    build_parallelism_config,
    build_scheduler,
)
from composer_remask.train.config import ConfigError, TrainConfig, load_config
from composer_remask.train.identity import RunFinished, check_run_folder
from composer_remask.train.preflight import (
    NonFiniteLossError,
    NonFiniteLossGuard,
    check_algorithms_with_tokenizer,
    check_corpus,
    check_training_eos,
    load_recipe_tokenizer,
    validate_recipe,
)
from composer_remask.train.report import RunReport, RunSummary, latest_checkpoint
from composer_remask.train.transforms import apply_cross_section_rules

log = logging.getLogger(__name__)

__all__ = ["build_trainer", "import_code_paths", "main", "train"]


def import_code_paths(paths: Sequence[str], where: str = "code_paths") -> None:
    """Import user files (``code_paths``) so that they can register their own entries."""
    for path in paths:
        if not Path(path).is_file():
            raise ConfigError(f"{where}: no such file {path!r} (relative paths are read from {Path.cwd()})")
    for index, path in enumerate(paths):
        spec = importlib.util.spec_from_file_location(f"remask_user_code_{index}", path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"code_paths: cannot import {path!r}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)


def build_trainer(cfg: TrainConfig) -> tuple[Trainer, RunReport]:
    """Every object of the recipe, then the Trainer (which starts the process group)."""
    import_code_paths(cfg.code_paths or [], cfg.where("code_paths"))
    as_written = cfg  # the run's identity: the recipe, not what this machine's cross-section rules made of it
    cfg = apply_cross_section_rules(cfg)
    algorithms = validate_recipe(cfg)  # constructed once, here
    install_safe_loading(trusted=cfg.trust_checkpoint_pickle)
    reproducibility.seed_all(cfg.seed)  # random-init weights depend on the recipe's seed

    tokenizer = load_recipe_tokenizer(cfg)
    check_algorithms_with_tokenizer(cfg, algorithms, tokenizer)
    check_corpus(cfg, tokenizer)
    if cfg.autoresume:
        prepare_save_folder(as_written)  # may stop here: another run's folder, or a finished run
    sizes = build_batch_sizes(cfg)
    train_loader, eval_loader = build_loaders(cfg, tokenizer, sizes)
    parallelism_config = build_parallelism_config(cfg)
    model = build_model(cfg, tokenizer)
    check_training_eos(cfg, tokenizer, model.model.config)  # refuse an EOS the model or corpus does not share
    optimizer = build_optimizer(cfg, model)
    report = RunReport(cfg.console_log_interval)

    try:
        trainer = Trainer(
            model=model,
            train_dataloader=train_loader,
            eval_dataloader=eval_loader,
            eval_interval=cfg.eval_interval if eval_loader is not None else 1,
            eval_subset_num_batches=cfg.eval_subset_num_batches if eval_loader is not None else -1,
            max_duration=cfg.max_duration,
            optimizers=optimizer,
            schedulers=build_scheduler(cfg),
            algorithms=algorithms,
            callbacks=[*build_callbacks(cfg), report, NonFiniteLossGuard()],
            loggers=build_loggers(cfg),
            run_name=cfg.run_name,
            # A progress bar redraws its line; in a log file every redraw becomes a line of its own.
            # Off the terminal the report's lines (every console_log_interval) say the same once.
            progress_bar=cfg.progress_bar and sys.stderr.isatty(),
            log_to_console=cfg.log_to_console,
            console_log_interval=cfg.console_log_interval,
            python_log_level=cfg.python_log_level,
            save_folder=cfg.save_folder,
            save_interval=cfg.save_interval,
            save_num_checkpoints_to_keep=cfg.save_num_checkpoints_to_keep,
            save_overwrite=cfg.save_overwrite,
            save_weights_only=cfg.save_weights_only,
            autoresume=cfg.autoresume,
            load_path=cfg.load_path,
            load_weights_only=cfg.load_weights_only,
            parallelism_config=parallelism_config,
            precision=cfg.precision,
            device_train_microbatch_size=sizes.device_train_microbatch_size,
            accumulate_train_batch_on_tokens=cfg.accumulate_train_batch_on_tokens,
            seed=cfg.seed,
            dist_timeout=cfg.dist_timeout,
        )
    except CheckpointError as error:  # Composer loads from a temporary copy: name the user's file too
        source = f"load_path {cfg.load_path!r}" if cfg.load_path else "the autoresume checkpoint"
        if cfg.autoresume and cfg.save_folder:
            source += f" (or the latest checkpoint in {cfg.save_folder!r})"
        raise type(error)(f"{cfg.source}: loading {source}: {error}") from error
    return trainer, report


def prepare_save_folder(cfg: TrainConfig) -> None:
    """Before autoresume: rank 0 moves checkpoints cut short by a crash aside and repoints ``latest``, then
    checks that the folder is this recipe's run and not finished (``identity.check_run_folder``). With
    several processes, every rank gets rank 0's verdict, so all of them stop or go on together (one rank
    stopping alone would leave the others waiting for it until ``dist_timeout``)."""
    from composer.utils import format_name_with_dist

    if not cfg.save_folder or "://" in cfg.save_folder:
        return
    verdict: Exception | None = None
    if dist.get_global_rank() == 0:
        folder = format_name_with_dist(cfg.save_folder, cfg.run_name or "")
        try:
            check_run_folder(cfg, folder, recover_save_folder(folder))
        except (RunFinished, ConfigError) as stop:
            verdict = stop
    if dist.get_world_size() > 1:
        dist.initialize_dist(None, timeout=cfg.dist_timeout)  # what the Trainer would start a moment later
        shared = [verdict]
        dist.broadcast_object_list(shared, src=0)
        verdict = shared[0]
    if verdict is not None:
        raise verdict


def train(cfg: TrainConfig) -> RunSummary:
    """Train the recipe, export it, and return the summary (printed on rank 0).

    Raises :class:`~composer_remask.train.identity.RunFinished` (``train.py`` exits 0) when autoresume
    finds the run already at ``max_duration``, and ``RunIdentityError`` (a ``ConfigError``) when the
    save folder holds another recipe's run; both before anything heavy is built.
    """
    trainer, report = build_trainer(cfg)
    try:
        if cfg.eval_first and trainer.state.evaluators and int(trainer.state.timestamp.batch) == 0:
            trainer.eval()
        trainer.fit()
        export = None
        if cfg.export_folder:
            exported = export_model(trainer.state.model, cfg.export_folder, cfg.export_dtype)
            export = str(exported) if exported is not None else cfg.export_folder
        state = trainer.state
        summary = RunSummary(
            run_name=state.run_name,
            batches=int(state.timestamp.batch),
            epochs=int(state.timestamp.epoch),
            samples=int(state.timestamp.sample),
            wall_seconds=report.wall_seconds(),
            final_losses=report.mean_losses(),
            last_lr=report.last_lr,
            eval_metrics={name: float(value) for name, value in state.eval_metric_values.items()},
            checkpoint=latest_checkpoint(trainer.saved_checkpoints, cfg.save_folder),
            export_folder=export,
            window=len(report.recent),
        )
        if dist.get_global_rank() == 0:
            print(summary.format(), flush=True)
            if cfg.save_folder:
                Path(cfg.save_folder).mkdir(parents=True, exist_ok=True)
                (Path(cfg.save_folder) / "summary.json").write_text(json.dumps(summary.as_dict(), indent=2))
        return summary
    finally:
        trainer.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train a recipe: composer train.py RECIPE.yaml [key=value ...] (or python train.py ...)",
        epilog="Checkpoints (autoresume, load_path=) are loaded by Composer, which unpickles them in full "
               "(torch.load(weights_only=False)): a crafted .pt could run code. Before Composer reads one, this "
               "entry point loads it with torch.load(weights_only=True) and the few numpy/datetime types a "
               "Composer checkpoint holds, and refuses it otherwise; trust_checkpoint_pickle=true skips the "
               "check for checkpoints you trust. Exported models (export_folder, remask-export) are "
               "safetensors: load those when you only need the weights.",
    )
    parser.add_argument("recipe", help="training YAML, e.g. yamls/tiny_cpu.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. max_duration=10ba optimizer.lr=2e-5")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.recipe, args.overrides)
        train(cfg)
    except (ConfigError, CheckpointError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 3
    except RunFinished as finished:  # not an error: the run the folder holds is done
        print(f"{parser.prog}: {finished}", flush=True)
        return 0
    return 0
