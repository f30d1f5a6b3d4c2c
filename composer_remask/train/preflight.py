"""What a recipe is checked for before its data and model are built, and the guard that runs with it.

- :func:`validate_recipe`: every section against what it builds (:func:`validate_sections`), then
  the algorithms (kept for the Trainer), the optimizer (on a stand-in parameter) and the schedule
  are constructed (``builders.construct``), so their own argument checks (a ``mask_prob`` of 1.5,
  a negative ``lr``) fail here, naming the recipe and key;
- :func:`load_recipe_tokenizer`: the tokenizer, with a missing folder reported as a recipe error;
- :func:`check_algorithms_with_tokenizer`: a ReMask ``mask_token_id`` inside the tokenizer's vocabulary;
- :func:`check_corpus`: the corpus's ``manifest.json`` (written by ``remask-data build``) against the
  recipe: the same tokenizer vocabulary, and a ``max_seq_len`` no shorter than the corpus's (rows
  are fitted to the corpus's length at build time; a shorter recipe would cut CoT answers);
- :func:`check_training_eos`: the tokenizer's EOS is the model config's and the corpus's;
- :class:`NonFiniteLossGuard`: stops a run whose loss is NaN or infinite before that batch is
  checkpointed or exported.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from composer.core import Algorithm, Callback, State
from composer.loggers import Logger
from transformers import PreTrainedTokenizerBase

from composer_remask.data.manifest import (
    CorpusMismatchError,
    EOSMismatchError,
    check_corpus_manifest,
    check_eos_agreement,
    corpus_manifests,
)
from composer_remask.remask.algorithm import ReMask
from composer_remask.train import registry
from composer_remask.train.builders import (
    build_algorithms,
    build_scheduler,
    build_tokenizer,
    construct,
    name_and_kwargs,
    named_sections,
    validate_sections,
)
from composer_remask.train.config import ConfigError, TrainConfig

__all__ = ["NonFiniteLossError", "NonFiniteLossGuard", "check_algorithms_with_tokenizer", "check_corpus", "check_training_eos", "load_recipe_tokenizer",
           "validate_recipe"]


def validate_recipe(cfg: TrainConfig, cuda_available: bool | None = None) -> list[Algorithm]:
    """All checks that need neither data nor weights; raises :class:`ConfigError` naming file and key.

    Returns the recipe's algorithms, constructed here once (through the registry), for the Trainer.
    """
    validate_sections(cfg, cuda_available)
    algorithms = build_algorithms(cfg)
    name, kwargs = name_and_kwargs(cfg.optimizer, cfg.where("optimizer"))
    stand_in = [torch.nn.Parameter(torch.zeros(1))]
    construct(cfg, registry.optimizers, name, kwargs, "optimizer", stand_in, name_key="optimizer.name")
    if cfg.scheduler is not None:
        build_scheduler(cfg)
    return algorithms


def load_recipe_tokenizer(cfg: TrainConfig) -> PreTrainedTokenizerBase:
    """The recipe's tokenizer; a folder that does not exist (or a hub name that does not load) is a recipe error."""
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


def check_algorithms_with_tokenizer(cfg: TrainConfig, algorithms: list[Algorithm],
                                    tokenizer: PreTrainedTokenizerBase) -> None:
    """A ReMask ``mask_token_id`` names a token of the run's tokenizer (ReMask's tokens included)."""
    for name, algorithm in zip(named_sections(cfg, "algorithms"), algorithms, strict=True):
        token_id = getattr(getattr(algorithm, "options", None), "mask_token_id", None)
        if isinstance(algorithm, ReMask) and token_id is not None and token_id >= len(tokenizer):
            raise ConfigError(
                f"{cfg.where(f'algorithms.{name}.mask_token_id')}: {token_id} is outside the tokenizer's vocabulary "
                f"({len(tokenizer)} tokens with ReMask's, ids 0 to {len(tokenizer) - 1}); remove the key to use "
                f"<|mask|> (id {tokenizer.convert_tokens_to_ids('<|mask|>')}), or give an id below {len(tokenizer)}")


def check_corpus(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """Compare each loader's corpus manifest with the recipe (``data/manifest.check_corpus_manifest``)."""
    for key in ("train_loader", "eval_loader"):
        section = getattr(cfg, key)
        if not section:
            continue
        seq_len = section.get("max_seq_len", cfg.max_seq_len)
        seq_key = f"{key}.max_seq_len" if "max_seq_len" in section else "max_seq_len"
        for path in corpus_manifests(section):
            try:
                check_corpus_manifest(path, tokenizer, seq_len, tokenizer_name=str(cfg.tokenizer.get("name")),
                                      seq_key=seq_key)
            except CorpusMismatchError as error:
                where = {"tokenizer": "tokenizer.name", "max_seq_len": seq_key}.get(error.setting or "", key)
                raise ConfigError(f"{cfg.where(where)}: {error}") from error


def check_training_eos(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase, model_config: Any) -> None:
    """The recipe's tokenizer, model config and training corpus agree on the EOS (``check_eos_agreement``).

    A mismatch is the recipe's :class:`ConfigError` (``train.py`` prints it and exits 2).
    """
    try:
        check_eos_agreement(tokenizer, model_config, corpus_manifests(cfg.train_loader))
    except EOSMismatchError as error:
        raise ConfigError(f"{cfg.source}: {error}") from error


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
