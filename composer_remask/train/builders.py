"""YAML sections -> objects: tokenizer, model, loaders, optimizer, schedule, algorithms, FSDP, logging.

Each builder checks its section against the signature of what it builds, so a misspelt key or a
wrong type is reported with the recipe's file and the dotted key before anything heavy runs.
"""

from __future__ import annotations

import dataclasses
import re
import typing
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from composer.core import Algorithm, Callback, DataSpec, Precision
from composer.loggers import LoggerDestination
from composer.utils import dist
from composer.utils.parallelism import FSDPConfig
from transformers import PreTrainedTokenizerBase

from composer_remask.arguments import check_type
from composer_remask.checks import blocking_ancestor
from composer_remask.data.tokenizer import load_tokenizer
from composer_remask.train import registry
from composer_remask.train.config import ConfigError, TrainConfig, check_kwargs
from composer_remask.train.model import INIT_DEVICES, ComposerCausalLM
from composer_remask.train.transforms import HYBRID_STRATEGIES, check_hybrid_degrees, fsdp_runs

__all__ = [
    "BatchSizes", "build_algorithms", "build_batch_sizes", "build_callbacks", "build_loaders", "build_loggers",
    "build_model", "build_optimizer", "build_parallelism_config", "build_scheduler", "build_tokenizer", "construct",
    "name_and_kwargs", "named_sections", "validate_sections",
]

# Values Composer's FSDP (v1) accepts, checked here so a typo fails before the model loads.
# Composer upper-cases sharding_strategy and backward_prefetch, but compares the other two as written.
FSDP_CHOICES = {
    "sharding_strategy": ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "_HYBRID_SHARD_ZERO2"),
    "backward_prefetch": ("BACKWARD_PRE", "BACKWARD_POST", "NONE"),
    "mixed_precision": ("FULL", "DEFAULT", "PURE"),
    "state_dict_type": ("full", "sharded"),
}
FSDP_CASE_INSENSITIVE = ("sharding_strategy", "backward_prefetch")


# ------------------------------------------------------------------------------------ tokenizer

def build_tokenizer(cfg: TrainConfig) -> PreTrainedTokenizerBase:
    """``tokenizer: {name: <hub id or path>, kwargs: {...}}``."""
    return load_tokenizer(**cfg.tokenizer)


# ---------------------------------------------------------------------------------------- model

def build_model(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase, init_device: str = "cpu") -> ComposerCausalLM:
    """The ``model`` section as written (``init_device`` follows FSDP in
    :func:`composer_remask.train.transforms.apply_cross_section_rules`)."""
    section = dict(cfg.model)
    builder = _lookup(registry.models, section.pop("name"), cfg.where("model.name"))
    init_device = section.pop("init_device", init_device)
    try:
        return builder(tokenizer, init_device, **section)
    except ConfigError as error:
        raise ConfigError(f"{cfg.source}: {error}") from error


# -------------------------------------------------------------------------------------- loaders

@dataclasses.dataclass(frozen=True)
class BatchSizes:
    world_size: int
    device_train_batch_size: int
    device_train_microbatch_size: int | str
    device_eval_batch_size: int


def build_batch_sizes(cfg: TrainConfig, world_size: int | None = None) -> BatchSizes:
    """Split ``global_train_batch_size`` over the ranks; the microbatch never exceeds the device batch."""
    world_size = world_size or dist.get_world_size()
    if cfg.global_train_batch_size <= 0 or cfg.global_train_batch_size % world_size:
        raise ConfigError(f"{cfg.where('global_train_batch_size')}: {cfg.global_train_batch_size} must be a "
                          f"positive multiple of the number of processes ({world_size})")
    device_batch = cfg.global_train_batch_size // world_size
    micro = cfg.device_train_microbatch_size
    if micro is None:
        micro = device_batch
    elif isinstance(micro, str):
        if micro != "auto":
            raise ConfigError(f"{cfg.where('device_train_microbatch_size')}: expected an int or 'auto', got {micro!r}")
    elif micro <= 0:
        raise ConfigError(f"{cfg.where('device_train_microbatch_size')}: must be positive, got {micro}")
    elif micro > device_batch:
        warnings.warn(f"device_train_microbatch_size {micro} > device batch {device_batch} "
                      f"({cfg.global_train_batch_size} / {world_size} processes); using {device_batch}", stacklevel=2)
        micro = device_batch
    eval_batch = cfg.device_eval_batch_size or (micro if isinstance(micro, int) else device_batch)
    return BatchSizes(world_size, device_batch, micro, eval_batch)


def build_loaders(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase,
                  sizes: BatchSizes) -> tuple[DataSpec, DataSpec | None]:
    """Train (and optional eval) loaders from the ``train_loader`` / ``eval_loader`` sections."""
    from composer_remask.data.dataset import build_dataloader

    def section(key: str) -> dict[str, Any]:
        loader_cfg = dict(getattr(cfg, key))
        loader_cfg.setdefault("max_seq_len", cfg.max_seq_len)
        return loader_cfg

    def build(key: str, batch_size: int) -> DataSpec:
        try:
            return build_dataloader(section(key), tokenizer, batch_size)
        except ConfigError:
            raise
        except (KeyError, TypeError, ValueError, FileNotFoundError) as error:
            raise ConfigError(f"{cfg.where(key)}: {error}") from error
        except RuntimeError as error:  # streaming: a local folder without index.json and no remote
            raise ConfigError(f"{cfg.where(key)}: {error} (build the corpus with `remask-data build ... "
                              "--out DIR` and point the recipe's streams at DIR)") from error

    train = build("train_loader", sizes.device_train_batch_size)
    evaluation = build("eval_loader", sizes.device_eval_batch_size) if cfg.eval_loader else None
    return train, evaluation


# ---------------------------------------------------------------------------- optimizer, schedule

def name_and_kwargs(section: Mapping[str, Any], where: str) -> tuple[str, dict[str, Any]]:
    """A ``{name: ..., **kwargs}`` section (optimizer, scheduler) split into the name and the arguments."""
    kwargs = dict(section)
    name = kwargs.pop("name", None)
    if not isinstance(name, str):
        raise ConfigError(f"{where}.name: missing required value (the registered name)")
    return name, kwargs


def _lookup(reg: registry.Registry, name: str, where: str) -> Any:
    try:
        return reg.get(name)
    except registry.UnknownNameError as error:
        raise ConfigError(f"{where}: {error}") from None


def _key_named_in(message: str, keys: Any) -> str | None:
    """The one argument name an error message mentions, to point at the exact dotted key."""
    named = [key for key in keys if re.search(rf"\b{re.escape(str(key))}\b", message)]
    return str(named[0]) if len(named) == 1 else None


def construct(cfg: TrainConfig, reg: registry.Registry, name: str, kwargs: Mapping[str, Any], section: str,
              *args: Any, name_key: str | None = None) -> Any:
    """The object YAML ``section`` describes: ``reg``'s builder for ``name``, called with ``*args`` and ``kwargs``.

    An unknown name, and an argument the builder itself refuses (a ``mask_prob`` of 1.5, a negative
    ``lr``), is a :class:`ConfigError` naming the recipe and the dotted key (``name_key`` is where
    the name is written, default ``section``). Preflight and the builders both construct through here.
    """
    builder = _lookup(reg, name, cfg.where(name_key or section))
    try:
        return builder(*args, **kwargs)
    except (ValueError, TypeError) as error:
        key = _key_named_in(str(error), kwargs)
        raise ConfigError(f"{cfg.where(f'{section}.{key}' if key else section)}: {error}") from error


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer section as written; arguments that follow from FSDP are filled in before
    (:func:`composer_remask.train.transforms.apply_cross_section_rules`)."""
    name, kwargs = name_and_kwargs(cfg.optimizer, cfg.where("optimizer"))
    return construct(cfg, registry.optimizers, name, kwargs, "optimizer", model.parameters(),
                     name_key="optimizer.name")


def build_scheduler(cfg: TrainConfig) -> Any:
    section = cfg.scheduler or {"name": "constant"}
    name, kwargs = name_and_kwargs(section, cfg.where("scheduler"))
    return construct(cfg, registry.schedulers, name, kwargs, "scheduler", name_key="scheduler.name")


# ----------------------------------------------------------------- algorithms, callbacks, loggers

def named_sections(cfg: TrainConfig, key: str) -> dict[str, dict[str, Any]]:
    """``algorithms`` / ``callbacks`` / ``loggers``: registered name -> its keyword arguments."""
    section = getattr(cfg, key) or {}
    for name, kwargs in section.items():
        if kwargs is not None and not isinstance(kwargs, dict):
            raise ConfigError(f"{cfg.where(f'{key}.{name}')}: expected a mapping of arguments, got {kwargs!r}")
    return {name: dict(kwargs or {}) for name, kwargs in section.items()}


def build_algorithms(cfg: TrainConfig) -> list[Algorithm]:
    return [construct(cfg, registry.algorithms, name, kwargs, f"algorithms.{name}")
            for name, kwargs in named_sections(cfg, "algorithms").items()]


def build_callbacks(cfg: TrainConfig) -> list[Callback]:
    return [_lookup(registry.callbacks, name, cfg.where(f"callbacks.{name}"))(**kwargs)
            for name, kwargs in named_sections(cfg, "callbacks").items()]


def build_loggers(cfg: TrainConfig) -> list[LoggerDestination]:
    return [_lookup(registry.loggers, name, cfg.where(f"loggers.{name}"))(**kwargs)
            for name, kwargs in named_sections(cfg, "loggers").items()]


# ------------------------------------------------------------------------------------------ FSDP

def build_parallelism_config(cfg: TrainConfig, cuda_available: bool | None = None) -> dict[str, Any] | None:
    """``fsdp_config`` -> ``Trainer(parallelism_config={'fsdp': ...})`` where FSDP runs (:func:`fsdp_runs`).

    FSDP (v1) needs CUDA; on a CPU machine the section is ignored with a warning, so the same
    recipe still trains there with DDP (``composer -n 2``).
    """
    if not fsdp_runs(cfg, cuda_available):
        if cfg.fsdp_config:
            warnings.warn("fsdp_config is ignored: FSDP needs CUDA GPUs; training with DDP instead", stacklevel=2)
        return None
    return {"fsdp": dict(cfg.fsdp_config)}


# ---------------------------------------------------------------------------------- validation

def validate_sections(cfg: TrainConfig, cuda_available: bool | None = None) -> None:
    """Check every section's keys and types against what it builds; cheap, imports no weights."""
    cuda_available = torch.cuda.is_available() if cuda_available is None else cuda_available

    check_kwargs(load_tokenizer, cfg.tokenizer, cfg.where("tokenizer"))

    model = dict(cfg.model)
    model_name = model.pop("name", None)
    if model_name is None:
        raise ConfigError(f"{cfg.where('model.name')}: missing required value (e.g. hf_causal_lm)")
    check_kwargs(_lookup(registry.models, model_name, cfg.where("model.name")), model, cfg.where("model"),
                 skip=("tokenizer",))
    init_device = model.get("init_device", "cpu")
    if init_device not in INIT_DEVICES:
        raise ConfigError(f"{cfg.where('model.init_device')}: {init_device!r} is not one of {', '.join(INIT_DEVICES)}")

    name, kwargs = name_and_kwargs(cfg.optimizer, cfg.where("optimizer"))
    check_kwargs(_lookup(registry.optimizers, name, cfg.where("optimizer.name")), kwargs, cfg.where("optimizer"),
                 skip=("params",))
    if cfg.scheduler is not None:
        name, kwargs = name_and_kwargs(cfg.scheduler, cfg.where("scheduler"))
        check_kwargs(_lookup(registry.schedulers, name, cfg.where("scheduler.name")), kwargs,
                     cfg.where("scheduler"))
    for key, reg in (("algorithms", registry.algorithms), ("callbacks", registry.callbacks),
                     ("loggers", registry.loggers)):
        for name, kwargs in named_sections(cfg, key).items():
            target = _lookup(reg, name, cfg.where(f"{key}.{name}"))
            check_kwargs(target, kwargs, cfg.where(f"{key}.{name}"))

    if cfg.fsdp_config:
        fields = [f.name for f in dataclasses.fields(FSDPConfig) if f.init and not f.name.startswith("_")]
        hints = typing.get_type_hints(FSDPConfig)
        for key, value in cfg.fsdp_config.items():
            where = cfg.where(f"fsdp_config.{key}")
            if key not in fields:
                raise ConfigError(f"{where}: unknown key. Known keys: {', '.join(fields)}")
            problem = check_type(value, hints.get(key, Any))
            if problem:
                raise ConfigError(f"{where}: {problem}")
            allowed = FSDP_CHOICES.get(key)
            written = str(value).upper() if key in FSDP_CASE_INSENSITIVE else value
            if allowed and written not in allowed:
                raise ConfigError(f"{where}: {value!r} is not one of {', '.join(allowed)}")
        if str(cfg.fsdp_config.get("sharding_strategy", "")).upper() in HYBRID_STRATEGIES:
            check_hybrid_degrees(cfg)

    precisions = [precision.value for precision in Precision]
    if cfg.precision not in precisions:
        raise ConfigError(f"{cfg.where('precision')}: {cfg.precision!r} is not a precision Composer knows; choose one "
                          f"of {', '.join(precisions)} (on CPU: fp32; bf16 on a GPU is amp_bf16)")
    if not cuda_available and cfg.precision != "fp32":
        raise ConfigError(f"{cfg.where('precision')}: {cfg.precision!r} is mixed precision for CUDA GPUs, and this "
                          "machine has none: on CPU set precision: fp32 (or precision=fp32 on the command line), "
                          "the one precision Composer trains with on CPU")
    if not cuda_available and cfg.device_train_microbatch_size == "auto":
        raise ConfigError(f"{cfg.where('device_train_microbatch_size')}: 'auto' needs a CUDA GPU; set a number")
    if cfg.autoresume and not (cfg.save_folder and cfg.run_name):
        raise ConfigError(f"{cfg.where('autoresume')}: autoresume needs both save_folder and run_name")
    for path in cfg.code_paths or []:
        if not Path(path).is_file():
            raise ConfigError(f"{cfg.where('code_paths')}: no such file {path!r}")
    if cfg.load_path and "://" not in cfg.load_path and not Path(cfg.load_path).exists():
        raise ConfigError(f"{cfg.where('load_path')}: no such checkpoint {cfg.load_path!r} (relative paths are read "
                          f"from {Path.cwd()}); point it at a Composer checkpoint (.pt file or sharded folder)")
    for key in ("save_folder", "export_folder"):
        problem = _output_folder_problem(getattr(cfg, key), cfg.run_name)
        if problem:
            raise ConfigError(f"{cfg.where(key)}: {problem}")


def _output_folder_problem(folder: str | None, run_name: str | None) -> str | None:
    """Why a local output folder cannot be written (a file in its place, no write permission), or None."""
    from composer.utils import format_name_with_dist

    if not folder or "://" in folder:
        return None
    path = Path(format_name_with_dist(folder, run_name or "")).expanduser().absolute()
    existing = blocking_ancestor(path)
    if existing is None:
        return None
    if not existing.is_dir():
        what = "is a file" if existing == path else f"cannot be created: {existing} is a file"
        return f"{str(path)!r} {what}; choose a folder path (or move the file away)"
    return f"{str(path)!r} cannot be written: no write permission on {existing}; choose a folder you can write to"


