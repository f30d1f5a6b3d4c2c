"""Training YAML -> a validated :class:`TrainConfig`, before anything heavy starts.

The shape follows llm-foundry's ``train.py``: one YAML file, ``variables`` for values that other
keys interpolate (``${variables.data_dir}``), and ``key=value`` overrides from the command line
(``max_duration=10ba``, ``optimizer.lr=2e-5``, ``~algorithms.remask`` to remove a key). Every error names the file (or the command-line
override) and the dotted key: unknown keys, wrong types, missing required values.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from composer_remask.arguments import check_type
from composer_remask.checks import non_finite_numbers

__all__ = ["ConfigError", "TrainConfig", "load_config", "check_kwargs"]

REQUIRED: Any = dataclasses.MISSING


class ConfigError(ValueError):
    """The recipe is wrong; the message names where (file or override) and which key."""


@dataclasses.dataclass
class TrainConfig:
    """Top-level keys of a training YAML (sections stay plain dicts, checked by their builders)."""

    # Required.
    model: dict[str, Any]
    tokenizer: dict[str, Any]
    train_loader: dict[str, Any]
    optimizer: dict[str, Any]
    max_duration: str | int
    max_seq_len: int
    global_train_batch_size: int

    # Schedule, evaluation, algorithms.
    scheduler: dict[str, Any] | None = None
    algorithms: dict[str, Any] | None = None
    eval_loader: dict[str, Any] | None = None
    eval_interval: str | int = "1ep"
    eval_first: bool = False
    eval_subset_num_batches: int = -1
    device_eval_batch_size: int | None = None

    # Batching and numerics.
    device_train_microbatch_size: int | str | None = None
    accumulate_train_batch_on_tokens: bool = False
    precision: str = "fp32"
    fsdp_config: dict[str, Any] | None = None
    seed: int = 17
    dist_timeout: float = 600.0

    # Monitoring.
    run_name: str | None = None
    progress_bar: bool = True
    log_to_console: bool = False
    console_log_interval: str | int = "10ba"
    python_log_level: str | None = None
    callbacks: dict[str, Any] | None = None
    loggers: dict[str, Any] | None = None

    # Checkpoints and export.
    save_folder: str | None = None
    save_interval: str | int = "1ep"
    save_num_checkpoints_to_keep: int = -1
    save_overwrite: bool = False
    save_weights_only: bool = False
    autoresume: bool = False
    load_path: str | None = None
    load_weights_only: bool = False
    # Composer unpickles checkpoints fully; by default they are first checked to load with
    # torch.load(weights_only=True). True skips the check (only for checkpoints you trust).
    trust_checkpoint_pickle: bool = False
    export_folder: str | None = None
    export_dtype: Literal["float32", "bfloat16", "float16"] | None = None

    # User code that registers its own entries, and free values for interpolation.
    code_paths: list[str] | None = None
    variables: dict[str, Any] | None = None

    # Where the values came from (not a YAML key).
    source: str = dataclasses.field(default="<dict>", repr=False)

    def where(self, key: str) -> str:
        return f"{self.source}: {key}"


TOP_LEVEL_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "source")


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a recipe, apply ``key=value`` overrides, resolve interpolation and validate the top level."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such recipe file")
    try:
        base = OmegaConf.load(path)
    except Exception as error:  # yaml.YAMLError and friends, with line numbers in the message
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(base, DictConfig):
        raise ConfigError(f"{path}: the recipe must be a mapping of keys to values")
    deletions = [item[1:] for item in overrides if item.startswith("~")]
    assignments = [item for item in overrides if not item.startswith("~")]
    for item in assignments:
        if "=" not in item:
            raise ConfigError(f"command line: override {item!r} must look like key=value (e.g. max_duration=10ba) "
                              "or ~key to remove a key")
    try:
        override_cfg = OmegaConf.from_dotlist(assignments)
    except OmegaConfBaseException as error:
        raise ConfigError(f"command line: cannot parse overrides {assignments}: {error}") from error
    merged = OmegaConf.merge(base, override_cfg)
    assert isinstance(merged, DictConfig)
    for key in deletions:
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(merged, parent_key) if parent_key else merged
        if not isinstance(parent, DictConfig) or leaf not in parent:
            raise ConfigError(f"command line override '~{key}': {path} has no key {key!r} to remove")
        del parent[leaf]
    return config_from_omegaconf(merged, source=str(path), overridden=_dotted_keys(override_cfg) | set(deletions))


def config_from_omegaconf(cfg: DictConfig, source: str = "<dict>",
                          overridden: set[str] | None = None) -> TrainConfig:
    """Validate an already-merged OmegaConf tree (used by :func:`load_config` and by tests)."""
    overridden = overridden or set()

    def where(key: str) -> str:
        hit = next((k for k in sorted(overridden) if key == k or key.startswith(k + ".") or k.startswith(key + ".")),
                   None)
        return f"{source} (command line override {hit!r})" if hit else source

    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(f"{where(missing[0])}: {missing[0]}: missing required value ('???')")
        raw = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as error:
        key = str(getattr(error, "full_key", None) or "?")
        raise ConfigError(f"{where(key)}: {key}: {getattr(error, 'msg', error)}") from error
    assert isinstance(raw, dict)

    known = set(TOP_LEVEL_KEYS)
    for key in raw:
        if key not in known:
            raise ConfigError(
                f"{where(str(key))}: unknown top-level key {key!r}. Known keys: {', '.join(TOP_LEVEL_KEYS)}. "
                "To define a value for interpolation, put it under `variables:` and refer to it as "
                f"${{variables.{key}}}.")
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        if field.name == "source":
            continue
        if field.name not in raw:
            if field.default is REQUIRED and field.default_factory is REQUIRED:
                raise ConfigError(f"{source}: {field.name}: missing required value")
            continue
        problem = check_type(raw[field.name], hints[field.name])
        if problem:
            raise ConfigError(f"{where(field.name)}: {field.name}: {problem}")
    for key, value in non_finite_numbers(raw):
        raise ConfigError(f"{where(key)}: {key}: must be a finite number, got {value!r}")
    for problem_key, problem in _top_level_problems(raw):
        raise ConfigError(f"{where(problem_key)}: {problem_key}: {problem}")
    if overridden:
        source = f"{source} (with command-line overrides {sorted(overridden)})"
    return TrainConfig(**raw, source=source)


DURATION_KEYS = ("max_duration", "eval_interval", "save_interval", "console_log_interval")
MIN_SEQ_LEN = 2  # one input token and one predicted token
SEED_LIMIT = 2**32  # numpy's RNG, seeded by Composer's reproducibility.seed_all, takes 0 <= seed < 2**32


def _top_level_problems(raw: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Values of the right type that still cannot run: durations, lengths, a run name that is a path."""
    from composer.core import Time, TimeUnit

    problems = []
    for key in DURATION_KEYS:
        if key in raw:
            try:
                duration = Time.from_input(raw[key], TimeUnit.BATCH if key == "console_log_interval" else TimeUnit.EPOCH)
            except (ValueError, TypeError, RuntimeError) as error:
                problems.append((key, f"not a duration ({error}); write e.g. 3ep, 100ba, 1000sp or 10000tok"))
                continue
            if duration.value <= 0 and key != "eval_interval":
                problems.append((key, f"must be positive, got {raw[key]!r}"))
    for key in ("max_seq_len", *(f"{loader}.max_seq_len" for loader in ("train_loader", "eval_loader"))):
        section, _, leaf = key.rpartition(".")
        holder = raw.get(section) if section else raw
        value = holder.get(leaf) if isinstance(holder, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value < MIN_SEQ_LEN:
            problems.append((key, f"must be at least {MIN_SEQ_LEN} (one input and one predicted token), got {value}"))
    seed = raw.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool) and not 0 <= seed < SEED_LIMIT:
        problems.append(("seed", f"must be a whole number from 0 to {SEED_LIMIT - 1} (the range every RNG the run "
                                 f"seeds accepts), got {seed}"))
    run_name = raw.get("run_name")
    if isinstance(run_name, str) and (not run_name.strip() or run_name in (".", "..") or "/" in run_name
                                      or "\\" in run_name or ".." in run_name or "\0" in run_name):
        problems.append(("run_name", f"{run_name!r} must be a plain name: no path separators or '..' "
                                     "(checkpoints go under save_folder/run_name)"))
    return problems


def _dotted_keys(cfg: Any, prefix: str = "") -> set[str]:
    if not isinstance(cfg, DictConfig):
        return {prefix} if prefix else set()
    keys: set[str] = set()
    for key in cfg:
        child = f"{prefix}.{key}" if prefix else str(key)
        value = cfg._get_node(key)
        keys |= _dotted_keys(value, child) if isinstance(value, DictConfig) and len(value) else {child}
    return keys


# --------------------------------------------------------------------------------- type checking

def check_kwargs(target: Callable[..., Any], kwargs: Mapping[str, Any], where: str,
                 skip: Sequence[str] = ()) -> None:
    """Check YAML keyword arguments against ``target``'s signature: unknown, missing, wrong type.

    ``where`` prefixes every message (``"recipe.yaml: optimizer"``); ``skip`` names parameters
    the builder fills in itself (``params`` of an optimizer).
    """
    signature = inspect.signature(target)
    try:
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:  # unresolvable forward references: check names only
        hints = {}
    parameters = {name: p for name, p in signature.parameters.items()
                  if name not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    accepts_any = any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())
    for key, value in kwargs.items():
        if key in skip:
            raise ConfigError(f"{where}.{key}: set by the trainer, remove it from the recipe")
        if key not in parameters:
            if accepts_any:
                continue
            raise ConfigError(f"{where}.{key}: unknown key. Known keys: {', '.join(parameters) or '(none)'}")
        problem = check_type(value, hints.get(key, parameters[key].annotation))
        if problem:
            raise ConfigError(f"{where}.{key}: {problem}")
    for name, parameter in parameters.items():
        if parameter.default is inspect.Parameter.empty and name not in kwargs:
            raise ConfigError(f"{where}.{name}: missing required value")
