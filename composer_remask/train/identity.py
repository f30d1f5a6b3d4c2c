"""A run folder records the recipe it belongs to, so autoresume never continues another run's training.

``run_identity.json`` (beside the checkpoints in the local ``save_folder``) holds the sha256 of the
resolved recipe without :data:`RESUMABLE_KEYS`, and that recipe itself (to name the keys that
differ). Before autoresume loads anything, :func:`check_run_folder`:

- refuses a folder whose identity differs while it holds a checkpoint (same model shape, another
  recipe: its optimizer and schedule would be continued silently) with :class:`RunIdentityError`,
  naming the file, both hashes and the differing keys;
- raises :class:`RunFinished` when the latest checkpoint already reached ``max_duration`` (counted in
  epochs or batches from its name, in samples from ``summary.json``; a duration in tokens is left to
  Composer): ``train.py`` then prints that the run is finished and exits 0 without training, so the
  finished run's ``summary.json`` is never overwritten;
- accepts a folder written before identities existed (no file) with one warning, and records the
  identity from then on.

A folder with no checkpoint yet takes the identity of the run that writes into it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

from composer_remask.checkpoints import CHECKPOINT_NAME
from composer_remask.train.config import ConfigError, TrainConfig

__all__ = ["IDENTITY_NAME", "RESUMABLE_KEYS", "RunFinished", "RunIdentityError", "check_run_folder",
           "recipe_identity", "write_identity"]

IDENTITY_NAME = "run_identity.json"
SUMMARY_NAME = "summary.json"

# What may change between a run and its resume without making it another run: how long it trains,
# how it is resumed or loaded, what it prints and logs (callbacks observe the run: monitors and their
# output paths), where and how often it saves, evaluates and exports, the microbatch split (the same
# math in other pieces), and values only other keys read (`variables`, `code_paths`). Everything else
# (model, tokenizer, data, optimizer, schedule, algorithms, batch size, precision, seed, run_name) is
# the run's identity.
RESUMABLE_KEYS = (
    "max_duration", "autoresume", "load_path", "load_weights_only", "trust_checkpoint_pickle",
    "progress_bar", "log_to_console", "console_log_interval", "python_log_level", "loggers", "callbacks",
    "save_folder", "save_interval", "save_num_checkpoints_to_keep", "save_overwrite",
    "eval_loader", "eval_interval", "eval_first", "eval_subset_num_batches", "device_eval_batch_size",
    "export_folder", "export_dtype", "device_train_microbatch_size", "dist_timeout", "code_paths", "variables",
)


class RunIdentityError(ConfigError):
    """The save folder holds another recipe's run; the message names the file, both hashes and the keys."""


class RunFinished(Exception):  # noqa: N818 - an outcome, not a failure: train.py exits 0
    """The run in the save folder already reached ``max_duration``: nothing to train."""


def recipe_identity(cfg: TrainConfig) -> dict[str, Any]:
    """The resolved recipe without :data:`RESUMABLE_KEYS` (JSON values, keys sorted)."""
    values = {field.name: getattr(cfg, field.name) for field in dataclasses.fields(cfg)
              if field.name != "source" and field.name not in RESUMABLE_KEYS}
    return json.loads(json.dumps(values, sort_keys=True, default=str))


def _hash(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def write_identity(folder: str | Path, cfg: TrainConfig) -> Path:
    """Record ``cfg``'s identity in ``folder`` (written to a temporary name, then renamed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    identity = recipe_identity(cfg)
    path = folder / IDENTITY_NAME
    partial = path.with_name(f".{IDENTITY_NAME}.partial")
    partial.write_text(json.dumps({"sha256": _hash(identity), "recipe": cfg.source, "resumable_keys":
                                   list(RESUMABLE_KEYS), "identity": identity}, indent=2, sort_keys=True))
    partial.replace(path)
    return path


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        flat: dict[str, Any] = {}
        for key, child in value.items():
            flat.update(_flatten(child, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def _differences(recorded: dict[str, Any], current: dict[str, Any], limit: int = 8) -> str:
    old, new = _flatten(recorded), _flatten(current)
    missing = object()
    keys = sorted(key for key in old.keys() | new.keys() if old.get(key, missing) != new.get(key, missing))
    shown = [f"{key}: {old.get(key, '(unset)')!r} there, {new.get(key, '(unset)')!r} here" for key in keys[:limit]]
    more = f"; and {len(keys) - limit} more" if len(keys) > limit else ""
    return "; ".join(shown) + more if shown else "(the recorded recipe is not readable key by key)"


def _finished(cfg: TrainConfig, folder: Path, latest: Path) -> str | None:
    """Where the latest checkpoint says the run stopped, when that is at or past ``max_duration``."""
    from composer.core import Time, TimeUnit

    match = CHECKPOINT_NAME.match(latest.name)
    if match is None:
        return None
    duration = Time.from_input(cfg.max_duration, TimeUnit.EPOCH)
    epoch, batch = int(match["epoch"]), int(match["batch"])
    if duration.unit == TimeUnit.EPOCH and epoch >= duration.value:
        return f"epoch {epoch} (batch {batch})"
    if duration.unit == TimeUnit.BATCH and batch >= duration.value:
        return f"batch {batch}"
    if duration.unit == TimeUnit.SAMPLE:
        try:
            samples = json.loads((folder / SUMMARY_NAME).read_text(encoding="utf-8")).get("samples")
        except (OSError, ValueError):
            return None
        if isinstance(samples, int) and samples >= duration.value:
            return f"sample {samples} (batch {batch})"
    return None


def check_run_folder(cfg: TrainConfig, folder: str | Path, latest: Path | None) -> None:
    """Before autoresume (rank 0, local folder; ``latest``: the checkpoint it would resume from): see
    the module docstring. Records this run's identity when the folder has none (or no checkpoint yet)."""
    folder = Path(folder)
    path = folder / IDENTITY_NAME
    current = recipe_identity(cfg)
    current_hash = _hash(current)
    if path.is_file() and latest is not None:
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))
            recorded_hash, recorded_identity = str(recorded["sha256"]), recorded.get("identity") or {}
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise RunIdentityError(f"{cfg.where('save_folder')}: cannot read {path} ({error}); delete it to resume "
                                   f"{folder} as this recipe's run, or use another save_folder or run_name") from error
        if recorded_hash != current_hash:
            raise RunIdentityError(
                f"{cfg.where('save_folder')}: {folder} holds another run: {path} records recipe sha256 "
                f"{recorded_hash} ({recorded.get('recipe', '?')}), this recipe is sha256 {current_hash}. Differing "
                f"keys: {_differences(recorded_identity, current)}. Autoresume would continue that run's weights, "
                f"optimizer and schedule. Use another save_folder or run_name, or delete {folder} to start over "
                f"(keys that may change on resume: {', '.join(RESUMABLE_KEYS)}).")
    elif latest is not None:
        warnings.warn(f"{folder} carries no {IDENTITY_NAME} (written before run identities were recorded): resuming "
                      f"it without checking that it is this recipe's run; its identity is recorded from now on",
                      stacklevel=2)
    if latest is not None:
        stopped = _finished(cfg, folder, latest)
        if stopped is not None:
            raise RunFinished(
                f"the run in {folder} is already finished: its latest checkpoint {latest.name} is at {stopped}, "
                f"max_duration is {cfg.max_duration}. Nothing was trained and its {SUMMARY_NAME} is unchanged. "
                "Raise max_duration to train further, or use another save_folder or run_name for a new run.")
    if not path.is_file() or latest is None:
        write_identity(folder, cfg)
