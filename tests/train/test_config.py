"""Recipes validate; bad YAML fails early with the file, the key and what was wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

from composer_remask.train import ConfigError, load_config
from composer_remask.train.builders import (
    build_algorithms,
    build_batch_sizes,
    build_loaders,
    build_parallelism_config,
    validate_sections,
)
from composer_remask.train.run import import_code_paths
from composer_remask.train.transforms import apply_cross_section_rules, lilith_is_sharded
from tests.helpers.recipes import REPO, TINY_RECIPE, TINY_TOKENIZER

RECIPES = sorted((REPO / "yamls").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def tiny_with(tmp_path: Path, edit) -> Path:
    """The tiny recipe with ``edit(dict)`` applied, written to a new file."""
    recipe = yaml.safe_load(TINY_RECIPE.read_text())
    edit(recipe)
    return write(tmp_path, yaml.safe_dump(recipe))


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_validates(recipe, monkeypatch):
    from composer_remask.train.run import import_code_paths

    monkeypatch.chdir(REPO)  # code_paths are relative to where training starts: the repository
    cfg = load_config(recipe)
    import_code_paths(cfg.code_paths or [])  # as training does: a recipe may register its own entries
    validate_sections(cfg, cuda_available=True)  # as on the GPU machines the 3B recipes are for
    assert cfg.model["name"] == "hf_causal_lm"


def test_3b_recipes_differ_only_where_they_must():
    def flat(tree, prefix=""):
        if isinstance(tree, dict):
            return {k: v for key, value in tree.items() for k, v in flat(value, f"{prefix}{key}.").items()}
        return {prefix.rstrip("."): tree}

    remask = flat(yaml.safe_load((REPO / "yamls/remask_3b.yaml").read_text()))
    for name, expected in (("masked_thought_3b", {"algorithms.remask.weight": 0.0}),
                           ("sft_3b", {"algorithms.remask.weight": 0.0, "algorithms.remask.mask_prob": 0.0})):
        other = flat(yaml.safe_load((REPO / f"yamls/{name}.yaml").read_text()))
        assert other.keys() == remask.keys()
        differences = {key: other[key] for key in remask if other[key] != remask[key]}
        assert differences == {**expected, "variables.run_name": name.replace("_", "-")}


def test_3b_recipe_has_the_card_settings():
    cfg = load_config(REPO / "yamls/remask_3b.yaml")
    assert cfg.model["pretrained_model_name_or_path"] == "stabilityai/stablelm-3b-4e1t"
    assert (cfg.max_seq_len, cfg.device_train_microbatch_size, cfg.global_train_batch_size) == (256, 16, 256)
    assert (cfg.max_duration, cfg.optimizer["name"], cfg.optimizer["lr"]) == ("6ep", "lilith", 1e-5)
    assert cfg.scheduler["name"] == "one_cycle_cosine"
    assert cfg.algorithms["remask"] == {"mask_prob": 0.4, "weight": 0.1, "divergence": "sym_kl",
                                        "mask_strategy": "mask_token", "rationale_label_drop_prob": 0.1,
                                        "answer_only_prob": 0.1}
    assert cfg.precision == "amp_bf16"
    assert cfg.fsdp_config["sharding_strategy"] == "FULL_SHARD"
    assert cfg.fsdp_config["mixed_precision"] == "PURE"
    assert cfg.fsdp_config["activation_checkpointing"] and not cfg.fsdp_config["activation_checkpointing_reentrant"]
    streams = cfg.train_loader["streams"]
    assert set(streams) == {"tinycot", "reddit", "oasst2"}
    assert streams["tinycot"]["local"] == "/tmp/remask-data/tinycot"  # ${variables.data_dir} resolved


@pytest.mark.parametrize("gpus", [8, 16])
def test_mcli_run_files(gpus):
    from mcli.api.runs import RunConfig

    path = REPO / f"yamls/mcli/remask_3b_{gpus}gpu.yaml"
    raw = yaml.safe_load(path.read_text())
    assert set(raw) <= {f.name for f in __import__("dataclasses").fields(RunConfig)}
    run = RunConfig.from_file(path)
    assert run.image == "mosaicml/pytorch:2.7.0_cu128-python3.12-ubuntu22.04"
    assert run.compute["gpus"] == gpus and run.compute["nodes"] == gpus // 8
    assert run.integrations[0]["integration_type"] == "git_repo"
    assert "composer train.py /mnt/config/parameters.yaml" in run.command
    assert "remask-data build" in run.command
    expected = yaml.safe_load((REPO / "yamls/remask_3b.yaml").read_text())
    if gpus > 8:  # HSDP across nodes: shard within a node, replicate across nodes
        expected["fsdp_config"].update(sharding_strategy="HYBRID_SHARD", data_parallel_shard_degree=8,
                                       data_parallel_replicate_degree=gpus // 8)
    assert run.parameters == expected
    assert 256 % gpus == 0  # the recipe's global batch splits over the GPUs


def test_overrides_and_interpolation():
    cfg = load_config(TINY_RECIPE, ["max_duration=10ba", "optimizer.lr=0.01", "variables.data_dir=/data/x",
                                    "~algorithms.remask", "~eval_loader"])
    assert cfg.max_duration == "10ba" and cfg.optimizer["lr"] == 0.01
    assert cfg.train_loader["streams"]["tinycot"]["local"] == "/data/x/tinycot"
    assert cfg.algorithms == {} and cfg.eval_loader is None
    with pytest.raises(ConfigError, match="has no key 'algorithms.mixup' to remove"):
        load_config(TINY_RECIPE, ["~algorithms.mixup"])


def test_unknown_top_level_key_suggests_variables(tmp_path):
    path = tiny_with(tmp_path, lambda r: r.update(learning_rate=0.1))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert str(path) in message and "'learning_rate'" in message and "variables" in message


def test_unknown_section_key_names_file_and_dotted_key(tmp_path):
    path = tiny_with(tmp_path, lambda r: r["optimizer"].update(lrr=0.1))
    with pytest.raises(ConfigError, match=r"recipe\.yaml.*optimizer\.lrr: unknown key"):
        validate_sections(load_config(path))


def test_wrong_type_from_the_command_line():
    with pytest.raises(ConfigError) as error:
        load_config(TINY_RECIPE, ["global_train_batch_size=lots"])
    message = str(error.value)
    assert "command line override 'global_train_batch_size'" in message
    assert "expected int, got 'lots'" in message


def test_wrong_type_in_a_section(tmp_path):
    path = tiny_with(tmp_path, lambda r: r["algorithms"]["remask"].update(mask_prob="high"))
    with pytest.raises(ConfigError, match=r"algorithms\.remask\.mask_prob: expected float, got 'high'"):
        validate_sections(load_config(path))


def test_missing_required_value(tmp_path):
    path = tiny_with(tmp_path, lambda r: r.pop("max_duration"))
    with pytest.raises(ConfigError, match=r"recipe\.yaml: max_duration: missing required value"):
        load_config(path)
    path = tiny_with(tmp_path, lambda r: r["optimizer"].update(lr="???"))
    with pytest.raises(ConfigError, match=r"optimizer\.lr: missing required value"):
        load_config(path)
    path = tiny_with(tmp_path, lambda r: r["optimizer"].pop("lr"))
    with pytest.raises(ConfigError, match=r"optimizer\.lr: missing required value"):
        validate_sections(load_config(path))


def test_bad_interpolation_names_the_key(tmp_path):
    path = tiny_with(tmp_path, lambda r: r.update(save_folder="${variables.nowhere}/ckpt"))
    with pytest.raises(ConfigError, match=r"recipe\.yaml: save_folder"):
        load_config(path)


def test_unknown_registered_name_lists_the_known_ones(tmp_path):
    path = tiny_with(tmp_path, lambda r: r["scheduler"].update(name="one_cycle"))
    with pytest.raises(ConfigError, match=r"unknown scheduler 'one_cycle'; known: .*one_cycle_cosine"):
        validate_sections(load_config(path))
    path = tiny_with(tmp_path, lambda r: r["algorithms"].update(mixup={}))
    with pytest.raises(ConfigError, match=r"algorithms\.mixup: unknown algorithm 'mixup'; known: .*remask"):
        validate_sections(load_config(path))


def test_fsdp_keys_are_checked(tmp_path):
    path = tiny_with(tmp_path, lambda r: r.update(fsdp_config={"sharding_strategy": "FULL_SHARD", "shard": True}))
    with pytest.raises(ConfigError, match=r"fsdp_config\.shard: unknown key"):
        validate_sections(load_config(path), cuda_available=True)
    path = tiny_with(tmp_path, lambda r: r.update(fsdp_config={"mixed_precision": "pure"}))
    with pytest.raises(ConfigError, match=r"fsdp_config\.mixed_precision: 'pure' is not one of FULL, DEFAULT, PURE"):
        validate_sections(load_config(path), cuda_available=True)
    path = tiny_with(tmp_path, lambda r: r.update(fsdp_config={"sharding_strategy": "HYBRID_SHARD"}))
    with pytest.raises(ConfigError, match="HYBRID_SHARD is not supported"):
        validate_sections(load_config(path), cuda_available=True)


def test_gpu_only_settings_fail_on_cpu():
    with pytest.raises(ConfigError, match=r"precision: 'amp_bf16' is mixed precision for CUDA GPUs.*on CPU set precision: fp32"):
        validate_sections(load_config(REPO / "yamls/remask_3b.yaml"), cuda_available=False)
    with pytest.raises(ConfigError, match="'auto' needs a CUDA GPU"):
        validate_sections(load_config(TINY_RECIPE, ["device_train_microbatch_size=auto"]), cuda_available=False)


def test_fsdp_only_where_cuda_runs_it():
    cfg = load_config(REPO / "yamls/remask_3b.yaml")
    parallelism = build_parallelism_config(cfg, cuda_available=True)
    assert parallelism == {"fsdp": cfg.fsdp_config}
    assert lilith_is_sharded(cfg, use_fsdp=True)
    with pytest.warns(UserWarning, match="FSDP needs CUDA"):
        assert build_parallelism_config(cfg, cuda_available=False) is None
    assert not lilith_is_sharded(cfg, use_fsdp=False)



def test_lilith_follows_fsdp_once_before_validation():
    """The optimizer section gets ``sharded``/``replicas`` from fsdp_config; written values are kept."""
    cfg = load_config(REPO / "yamls/remask_3b.yaml")
    on_gpus = apply_cross_section_rules(cfg, cuda_available=True)
    assert (on_gpus.optimizer["sharded"], on_gpus.optimizer["replicas"]) == (True, 1)
    assert "sharded" not in cfg.optimizer  # the loaded config is left as read
    assert apply_cross_section_rules(cfg, cuda_available=False).optimizer["sharded"] is False
    written = load_config(REPO / "yamls/remask_3b.yaml", ["optimizer.sharded=false"])
    assert apply_cross_section_rules(written, cuda_available=True).optimizer["sharded"] is False
    hybrid = load_config(REPO / "yamls/remask_3b.yaml", [
        "fsdp_config.sharding_strategy=HYBRID_SHARD", "fsdp_config.data_parallel_replicate_degree=2"])
    assert apply_cross_section_rules(hybrid, cuda_available=True).optimizer["replicas"] == 2
    per_flat_buffer = load_config(REPO / "yamls/remask_3b.yaml", ["fsdp_config.use_orig_params=false"])
    with pytest.raises(ConfigError, match=r"use_orig_params: Lilith works per tensor"):
        apply_cross_section_rules(per_flat_buffer, cuda_available=False)  # refused before the GPUs are reached

def test_batch_sizes_split_over_processes():
    cfg = load_config(REPO / "yamls/remask_3b.yaml")
    sizes = build_batch_sizes(cfg, world_size=8)
    assert (sizes.device_train_batch_size, sizes.device_train_microbatch_size) == (32, 16)
    with pytest.warns(UserWarning, match="using 8"):
        assert build_batch_sizes(cfg, world_size=32).device_train_microbatch_size == 8
    with pytest.raises(ConfigError, match=r"global_train_batch_size: 256 must be a positive multiple .* \(3\)"):
        build_batch_sizes(cfg, world_size=3)


def test_remask_needs_no_weighting_setting_whatever_the_accumulation():
    for value in ("true", "false"):
        cfg = load_config(TINY_RECIPE, [f"accumulate_train_batch_on_tokens={value}"])
        assert build_algorithms(cfg)[0].loss_weighting == "auto"  # read from the Trainer at run time
    explicit = load_config(TINY_RECIPE, ["algorithms.remask.loss_weighting=samples"])
    assert build_algorithms(explicit)[0].loss_weighting == "samples"


def test_recipes_state_the_loss_weighting_their_trainer_uses():
    """The recipe builds the Trainer and ReMask: ``auto`` becomes the mode the project's DataSpec gives."""
    for value, mode in (("true", "tokens"), ("false", "samples")):
        cfg = apply_cross_section_rules(load_config(TINY_RECIPE, [f"accumulate_train_batch_on_tokens={value}"]))
        assert build_algorithms(cfg)[0].loss_weighting == mode
    written = apply_cross_section_rules(load_config(TINY_RECIPE, ["accumulate_train_batch_on_tokens=true",
                                                                  "algorithms.remask.loss_weighting=samples"]))
    assert build_algorithms(written)[0].loss_weighting == "samples"  # a written value is kept


def test_user_code_registers_its_own_algorithm(tmp_path):
    plugin = write(tmp_path, '''
from composer.core import Algorithm
from composer_remask.train.registry import algorithms

@algorithms.register("count_batches_test")
class CountBatches(Algorithm):
    def __init__(self, every: int = 1):
        self.every = every
    def match(self, event, state):
        return False
    def apply(self, event, state, logger):
        pass
''', name="plugin.py")
    recipe = tiny_with(tmp_path, lambda r: r.update(code_paths=[str(plugin)],
                                                    algorithms={"count_batches_test": {"every": 3}}))
    cfg = load_config(recipe)
    import_code_paths(cfg.code_paths)
    validate_sections(cfg)
    (algorithm,) = build_algorithms(cfg)
    assert type(algorithm).__name__ == "CountBatches" and algorithm.every == 3


def test_missing_corpus_is_a_config_error(tmp_path):
    cfg = load_config(TINY_RECIPE, [f"variables.data_dir={tmp_path / 'nowhere'}"])
    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    with pytest.raises(ConfigError, match=r"train_loader: .*nowhere/tinycot/index\.json.*remask-data build"):
        build_loaders(cfg, tokenizer, build_batch_sizes(cfg, world_size=1))
