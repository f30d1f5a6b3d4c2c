"""Recipes (YAML) -> Composer objects -> a training run. Entry point: ``composer train.py RECIPE.yaml``."""

from composer_remask.train.config import ConfigError, TrainConfig, load_config
from composer_remask.train.run import build_trainer, main, train

__all__ = ["ConfigError", "TrainConfig", "build_trainer", "load_config", "main", "train"]
