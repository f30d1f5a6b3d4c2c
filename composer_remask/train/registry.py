"""Name -> builder registries for the YAML sections ``model``, ``algorithms``, ``optimizer``,
``scheduler``, ``callbacks`` and ``loggers`` (in the spirit of llm-foundry's registries).

A YAML key names a registered entry; its mapping holds the keyword arguments. User code registers
its own entries, for example from a file listed in the recipe's ``code_paths``::

    from composer_remask.train.registry import algorithms

    @algorithms.register("my_algo")
    class MyAlgorithm(composer.core.Algorithm): ...
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T", bound=Callable[..., Any])

__all__ = ["Registry", "UnknownNameError", "algorithms", "callbacks", "loggers", "models", "optimizers",
           "schedulers"]


class UnknownNameError(KeyError):
    """A YAML section names an entry that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry:
    """A named collection of builders (classes or functions returning the object)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., Any]] = {}

    def register(self, name: str, builder: T | None = None, *, override: bool = False) -> Any:
        """Register ``builder`` under ``name``; usable as a decorator when ``builder`` is omitted."""

        def add(target: T) -> T:
            if name in self._entries and not override and self._entries[name] is not target:
                raise ValueError(f"{self.kind} {name!r} is already registered; pass override=True to replace it")
            self._entries[name] = target
            return target

        return add(builder) if builder is not None else add

    def get(self, name: str) -> Callable[..., Any]:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._entries)) or '(none)'}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return sorted(self._entries)


models = Registry("model")
algorithms = Registry("algorithm")
optimizers = Registry("optimizer")
schedulers = Registry("scheduler")
callbacks = Registry("callback")
loggers = Registry("logger")


def _register_builtins() -> None:
    """Every entry that ships with composer-remask, registered here and nowhere else (Composer's loggers
    import their packages only when built)."""
    import torch
    from composer import callbacks as composer_callbacks
    from composer import loggers as composer_loggers
    from composer.optim import DecoupledAdamW, scheduler

    from composer_remask.optim import Lilith, OneCycleCosineScheduler
    from composer_remask.remask.algorithm import ReMask
    from composer_remask.train.model import hf_causal_lm

    models.register("hf_causal_lm", hf_causal_lm)

    algorithms.register("remask", ReMask)

    optimizers.register("lilith", Lilith)
    optimizers.register("adamw", torch.optim.AdamW)
    optimizers.register("decoupled_adamw", DecoupledAdamW)

    schedulers.register("one_cycle_cosine", OneCycleCosineScheduler)
    schedulers.register("cosine_with_warmup", scheduler.CosineAnnealingWithWarmupScheduler)
    schedulers.register("linear_decay_with_warmup", scheduler.LinearWithWarmupScheduler)
    schedulers.register("constant_with_warmup", scheduler.ConstantWithWarmupScheduler)
    schedulers.register("constant", scheduler.ConstantScheduler)

    callbacks.register("speed_monitor", composer_callbacks.SpeedMonitor)
    callbacks.register("lr_monitor", composer_callbacks.LRMonitor)
    callbacks.register("memory_monitor", composer_callbacks.MemoryMonitor)
    callbacks.register("runtime_estimator", composer_callbacks.RuntimeEstimator)
    callbacks.register("optimizer_monitor", composer_callbacks.OptimizerMonitor)

    loggers.register("tensorboard", composer_loggers.TensorboardLogger)
    loggers.register("mlflow", composer_loggers.MLFlowLogger)
    loggers.register("wandb", composer_loggers.WandBLogger)
    loggers.register("file", composer_loggers.FileLogger)


_register_builtins()
