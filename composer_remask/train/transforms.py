"""Cross-section rules: one section's arguments that follow from another section, applied once.

A rule rewrites the :class:`TrainConfig` before validation, so the builders only turn each YAML
section into its registered object and never look at another section or at a registered name.
The rules:

* Lilith follows FSDP: under FSDP every tensor is sharded across ranks, so Lilith must all-reduce
  its trust-ratio norms (``optimizer.sharded``), and under HSDP it divides the summed norms by the
  number of replicas (``optimizer.replicas``). Values written in the recipe are kept.
* ``model.init_device: mixed`` and FSDP follow each other: 'mixed' needs ``fsdp_config``; where
  FSDP runs, ``sync_module_states`` is turned on (the ranks that built on meta get rank 0's weights
  that way; a written ``false`` is refused); where it does not (no CUDA), every rank loads the
  weights (``init_device: cpu``, with a warning), since no rank may be left on meta.
* ReMask's ``loss_weighting`` follows ``accumulate_train_batch_on_tokens``: the recipe builds both
  the Trainer and ReMask, and its loaders are the project's DataSpec, which counts samples as rows
  and loss-generating tokens with ``batch_loss_tokens``, exactly as ReMask's declared modes do. So
  ``auto`` (the default) becomes ``tokens`` or ``samples`` and the weight is stated, not read off
  the running Trainer; ReMask's probe still checks it on the first microbatch. A value written in
  the recipe is kept.

Whether FSDP runs is decided in one place, :func:`fsdp_runs`.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch

from composer_remask.train.config import ConfigError, TrainConfig

__all__ = ["HYBRID_STRATEGIES", "apply_cross_section_rules", "check_hybrid_degrees", "declared_loss_weighting",
           "fsdp_runs", "lilith_is_sharded", "lilith_replicas"]

SHARDING_STRATEGIES_WITH_WHOLE_RANK_SHARDS = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD")
HYBRID_STRATEGIES = ("HYBRID_SHARD", "_HYBRID_SHARD_ZERO2")  # shards within a node, replicas across nodes


def fsdp_runs(cfg: TrainConfig, cuda_available: bool | None = None) -> bool:
    """Whether the run uses FSDP: ``fsdp_config`` is given and CUDA is there (FSDP v1 needs it)."""
    cuda_available = torch.cuda.is_available() if cuda_available is None else cuda_available
    return bool(cfg.fsdp_config) and cuda_available


def check_hybrid_degrees(cfg: TrainConfig) -> None:
    """HSDP needs a 2-D mesh: without a replicate degree Composer quietly falls back to FULL_SHARD."""
    assert cfg.fsdp_config is not None
    strategy = str(cfg.fsdp_config.get("sharding_strategy")).upper()
    replicas = cfg.fsdp_config.get("data_parallel_replicate_degree")
    if not isinstance(replicas, int) or replicas < 1:
        raise ConfigError(f"{cfg.where('fsdp_config.data_parallel_replicate_degree')}: {strategy} is not supported "
                          "without it: set it to the number of nodes (and data_parallel_shard_degree to the GPUs "
                          "per node)")


def lilith_is_sharded(cfg: TrainConfig, use_fsdp: bool) -> bool:
    """Whether Lilith must all-reduce its trust-ratio norms (FSDP shards every tensor across ranks)."""
    if not use_fsdp or not cfg.fsdp_config:
        return False
    strategy = str(cfg.fsdp_config.get("sharding_strategy", "FULL_SHARD")).upper()
    if strategy in HYBRID_STRATEGIES:
        check_hybrid_degrees(cfg)  # Lilith divides the summed norms by the replicas (lilith_replicas)
    elif strategy not in SHARDING_STRATEGIES_WITH_WHOLE_RANK_SHARDS:
        raise ConfigError(f"{cfg.where('fsdp_config.sharding_strategy')}: Lilith needs whole-tensor norms; "
                          f"{strategy} is not supported with it, use FULL_SHARD or SHARD_GRAD_OP")
    if not cfg.fsdp_config.get("use_orig_params", True):
        raise ConfigError(f"{cfg.where('fsdp_config.use_orig_params')}: Lilith works per tensor and needs "
                          "use_orig_params: true")
    return strategy != "NO_SHARD"


def lilith_replicas(cfg: TrainConfig) -> int:
    """Identical copies of each shard in the default process group: the replicate degree under HSDP, else 1."""
    strategy = str((cfg.fsdp_config or {}).get("sharding_strategy", "FULL_SHARD")).upper()
    return int(cfg.fsdp_config["data_parallel_replicate_degree"]) if strategy in HYBRID_STRATEGIES else 1


def declared_loss_weighting(cfg: TrainConfig) -> dict[str, Any] | None:
    """The ``algorithms`` section with each ReMask's ``loss_weighting: auto`` stated as the Trainer will weight.

    ``tokens`` under ``accumulate_train_batch_on_tokens`` (the project's DataSpec counts
    loss-generating tokens with ``batch_loss_tokens``), else ``samples``.
    """
    from composer_remask.remask import ReMask
    from composer_remask.train import registry

    if not cfg.algorithms:
        return cfg.algorithms
    mode = "tokens" if cfg.accumulate_train_batch_on_tokens else "samples"
    algorithms = dict(cfg.algorithms)
    for name, kwargs in algorithms.items():
        builder = registry.algorithms.get(name) if name in registry.algorithms else None
        is_remask = isinstance(builder, type) and issubclass(builder, ReMask)
        if is_remask and isinstance(kwargs, (dict, type(None))) and (kwargs or {}).get("loss_weighting", "auto") == "auto":
            algorithms[name] = {**(kwargs or {}), "loss_weighting": mode}
    return algorithms


def apply_cross_section_rules(cfg: TrainConfig, cuda_available: bool | None = None) -> TrainConfig:
    """``cfg`` with the arguments that follow from other sections filled in (a copy; ``cfg`` is kept).

    Run it once, before validation. A recipe whose FSDP settings Lilith cannot follow is refused
    here even on a machine without CUDA, so the mistake shows before the run reaches the GPUs.
    """
    use_fsdp = fsdp_runs(cfg, cuda_available)
    optimizer = dict(cfg.optimizer)
    if optimizer.get("name") == "lilith":
        if cfg.fsdp_config:
            lilith_is_sharded(cfg, use_fsdp=True)  # refuse FSDP settings Lilith cannot follow
        if "sharded" not in optimizer:
            optimizer["sharded"] = lilith_is_sharded(cfg, use_fsdp)
            if optimizer["sharded"] and "replicas" not in optimizer:
                optimizer["replicas"] = lilith_replicas(cfg)

    model = dict(cfg.model)
    fsdp_config = dict(cfg.fsdp_config) if cfg.fsdp_config else cfg.fsdp_config
    if model.get("init_device") == "mixed":
        if not cfg.fsdp_config:
            raise ConfigError(f"{cfg.where('model.init_device')}: 'mixed' builds the weights on rank 0 only and "
                              "needs FSDP to share them: add fsdp_config (it turns on sync_module_states)")
        if cfg.fsdp_config.get("sync_module_states") is False:
            raise ConfigError(f"{cfg.where('fsdp_config.sync_module_states')}: must be true with "
                              "model.init_device 'mixed' (the other ranks get rank 0's weights that way)")
        if use_fsdp:
            fsdp_config.setdefault("sync_module_states", True)
        else:
            warnings.warn("model.init_device 'mixed' needs FSDP (fsdp_config on CUDA GPUs); loading the weights "
                          "on every rank instead", stacklevel=2)
            model["init_device"] = "cpu"
    return dataclasses.replace(cfg, optimizer=optimizer, model=model, fsdp_config=fsdp_config,
                               algorithms=declared_loss_weighting(cfg))
