"""What a recipe is checked for before its data and model are built, and the guard that runs with it.

- :func:`validate_recipe`: every section against what it builds (:func:`validate_sections`), then
  the algorithms, optimizer and schedule are constructed once on a stand-in parameter, so their own
  argument checks (a ``mask_prob`` of 1.5, a negative ``lr``) fail here, naming the recipe and key;
- :func:`load_recipe_tokenizer`: the tokenizer, with a missing folder reported as a recipe error;
- :func:`check_corpus`: the corpus's ``manifest.json`` (written by ``remask-data build``) against the
  recipe: the same tokenizer vocabulary, and a ``max_seq_len`` no shorter than the corpus's (rows
  are fitted to the corpus's length at build time; a shorter recipe would cut CoT answers);
- :class:`NonFiniteLossGuard`: stops a run whose loss is NaN or infinite before that batch is
  checkpointed or exported.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from transformers import PreTrainedTokenizerBase

from composer_remask.train import registry
from composer_remask.train.config import ConfigError, TrainConfig

__all__ = ["NonFiniteLossError", "NonFiniteLossGuard", "check_corpus", "load_recipe_tokenizer", "validate_recipe"]


def _key_named_in(message: str, keys: Any) -> str | None:
    """The one argument name an error message mentions, to point at the exact dotted key."""
    named = [key for key in keys if re.search(rf"\b{re.escape(str(key))}\b", message)]
    return str(named[0]) if len(named) == 1 else None


def _constructed(cfg: TrainConfig, section: str, build: Any, kwargs: dict[str, Any]) -> Any:
    try:
        return build()
    except (ValueError, TypeError) as error:
        key = _key_named_in(str(error), kwargs)
        where = cfg.where(f"{section}.{key}" if key else section)
        raise ConfigError(f"{where}: {error}") from error


def validate_recipe(cfg: TrainConfig, cuda_available: bool | None = None) -> None:
    """All checks that need neither data nor weights; raises :class:`ConfigError` naming file and key."""
    from composer_remask.train.builders import _named_sections, validate_sections

    validate_sections(cfg, cuda_available)
    for name, kwargs in _named_sections(cfg, "algorithms").items():
        target = registry.algorithms.get(name)
        _constructed(cfg, f"algorithms.{name}", lambda t=target, k=kwargs: t(**k),
                     kwargs)

    optimizer_kwargs = {key: value for key, value in cfg.optimizer.items() if key != "name"}
    optimizer_class = registry.optimizers.get(cfg.optimizer["name"])
    stand_in = [torch.nn.Parameter(torch.zeros(1))]
    _constructed(cfg, "optimizer", lambda: optimizer_class(stand_in, **optimizer_kwargs), optimizer_kwargs)
    if cfg.scheduler is not None:
        scheduler_kwargs = {key: value for key, value in cfg.scheduler.items() if key != "name"}
        scheduler_class = registry.schedulers.get(cfg.scheduler["name"])
        _constructed(cfg, "scheduler", lambda: scheduler_class(**scheduler_kwargs), scheduler_kwargs)


def load_recipe_tokenizer(cfg: TrainConfig) -> PreTrainedTokenizerBase:
    """The recipe's tokenizer; a folder that does not exist (or a hub name that does not load) is a recipe error."""
    from composer_remask.train.builders import build_tokenizer

    name = str(cfg.tokenizer.get("name"))
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
    if looks_like_path and not Path(name).expanduser().exists():
        raise ConfigError(f"{cfg.where('tokenizer.name')}: no such tokenizer folder {name!r} "
                          f"(relative paths are read from {Path.cwd()})")
    try:
        return build_tokenizer(cfg)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{cfg.where('tokenizer.name')}: cannot load the tokenizer {name!r}: neither a local "
                          f"folder (relative to {Path.cwd()}) nor a model that loads from the hub ({error})") from error


def check_corpus(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """Compare each loader's corpus manifest with the recipe (see the module docstring)."""
    from composer_remask.data.writer import vocabulary_hash
    from composer_remask.pretrained import corpus_manifests

    recipe_hash: str | None = None
    for key in ("train_loader", "eval_loader"):
        section = getattr(cfg, key)
        if not section:
            continue
        seq_len = section.get("max_seq_len", cfg.max_seq_len)
        seq_key = f"{key}.max_seq_len" if "max_seq_len" in section else "max_seq_len"
        for path in corpus_manifests(section):
            try:
                manifest = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:
                raise ConfigError(f"{cfg.where(key)}: cannot read the corpus manifest {path}: {error}") from error
            built_with = manifest.get("tokenizer") or {}
            corpus_hash = built_with.get("vocab_sha256")
            if corpus_hash:
                recipe_hash = recipe_hash or vocabulary_hash(tokenizer)
                if corpus_hash != recipe_hash:
                    raise ConfigError(
                        f"{cfg.where('tokenizer.name')}: the recipe's tokenizer {cfg.tokenizer.get('name')!r} "
                        f"(vocabulary sha256 {recipe_hash}, {len(tokenizer)} tokens) is not the one {path} was "
                        f"built with ({built_with.get('name')!r}, vocabulary sha256 {corpus_hash}, "
                        f"{built_with.get('vocab_size')} tokens): the token ids would mean other tokens. "
                        "Rebuild the corpus with this tokenizer, or train with the corpus's.")
            corpus_len = manifest.get("max_seq_len")
            if isinstance(corpus_len, int) and isinstance(seq_len, int) and seq_len < corpus_len:
                raise ConfigError(
                    f"{cfg.where(seq_key)}: {seq_len} is shorter than the max_seq_len {corpus_len} that {path} "
                    f"was built with: rows would be cut at {seq_len} tokens, CoT answers included. Set "
                    f"{seq_key}: {corpus_len} (or more), or rebuild the corpus with --max-seq-len {seq_len}.")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped before saving that batch."""


class NonFiniteLossGuard(Callback):
    """Stop the run at the first batch whose loss (any ``loss/train/*`` term) is NaN or infinite.

    Runs at ``BATCH_END``, on the loss Composer has already averaged over every rank (so all ranks
    stop together), which comes before ``BATCH_CHECKPOINT``: that batch is never checkpointed, the
    ``latest`` checkpoint stays the last good one, and the export at the end of training never runs.
    """

    def batch_end(self, state: State, logger: Logger) -> None:
        losses = state.total_loss_dict or {}
        bad = {key: float(value) for key, value in losses.items() if not math.isfinite(float(value))}
        if bad:
            terms = ", ".join(f"{key} {value}" for key, value in sorted(bad.items()))
            raise NonFiniteLossError(
                f"non-finite training loss at batch {int(state.timestamp.batch)} (epoch {int(state.timestamp.epoch)}, "
                f"batch {int(state.timestamp.batch_in_epoch)} of the epoch): {terms}. Stopped before saving this "
                "batch: the last checkpoint and any earlier export are unchanged. Lower the learning rate, check "
                "the data, or use fp32 / bf16.")
