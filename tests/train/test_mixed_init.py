"""``model.init_device: mixed``: one copy of the weights per node, FSDP fills the rest (FULL_SHARD and HSDP)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from transformers import StableLmForCausalLM

from composer_remask.data.tokenizer import load_tokenizer
from composer_remask.train import ConfigError, load_config
from composer_remask.train.builders import (
    build_model,
    build_parallelism_config,
    validate_sections,
)
from composer_remask.train.model import hf_causal_lm
from composer_remask.train.transforms import apply_cross_section_rules
from tests.helpers.recipes import REPO, TINY_RECIPE, TINY_TOKENIZER
from tests.helpers.tiny_model import tiny_stablelm_config


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """A tiny pretrained-style folder whose vocabulary (1000) is smaller than the tokenizer's: rows get added."""
    folder = tmp_path_factory.mktemp("tiny-pretrained")
    torch.manual_seed(3)
    StableLmForCausalLM(tiny_stablelm_config(1000)).save_pretrained(folder)
    return folder


def mixed_recipe(tmp_path: Path, fsdp: dict | None) -> Path:
    recipe = yaml.safe_load(TINY_RECIPE.read_text())
    recipe["model"]["init_device"] = "mixed"
    if fsdp is not None:
        recipe["fsdp_config"] = fsdp
    path = tmp_path / "mixed.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_other_ranks_build_on_meta_with_real_buffers(saved_model, monkeypatch):
    tokenizer = load_tokenizer(str(TINY_TOKENIZER))
    monkeypatch.setenv("LOCAL_RANK", "1")
    meta = hf_causal_lm(tokenizer, "mixed", pretrained_model_name_or_path=str(saved_model))
    monkeypatch.setenv("LOCAL_RANK", "0")
    loaded = hf_causal_lm(tokenizer, "mixed", pretrained_model_name_or_path=str(saved_model))

    assert {p.device.type for p in meta.model.parameters()} == {"meta"}
    assert {b.device.type for b in meta.model.buffers()} == {"cpu"}  # rotary tables are computed, not synced
    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}
    shapes = {k: v.shape for k, v in loaded.model.state_dict().items()}
    assert {k: v.shape for k, v in meta.model.state_dict().items()} == shapes
    assert shapes["model.embed_tokens.weight"][0] == 2112  # grown for the tokenizer on both
    assert meta.num_parameters == loaded.num_parameters  # MFU counts the same model everywhere
    for name, buffer in meta.model.named_buffers():
        assert torch.equal(buffer, dict(loaded.model.named_buffers())[name])


def test_param_init_fn_gives_meta_modules_the_model_init():
    """What Composer calls after moving a meta module to the GPU: finite, initialized values."""
    from composer_remask.train.model import ComposerCausalLM, causal_lm_on_meta

    hf = causal_lm_on_meta(tiny_stablelm_config(64))
    ComposerCausalLM(hf, tokenizer=None)
    layer = hf.model.layers[0]
    for module in layer.modules():
        if any(p.is_meta for p in module.parameters(recurse=False)):
            module.to_empty(device="cpu", recurse=False)
            hf.param_init_fn(module)
    q = layer.self_attn.q_proj.weight
    # initializer_range 0.02; the std of 32 x 32 normal draws has sd 0.02 / sqrt(2 * 1024) = 4.4e-4, so
    # 0.02 +- 0.01 is ~22 sigmas: not exactness, it tells an initialised weight from zeros or a default init.
    assert torch.isfinite(q).all() and 0.01 < q.std().item() < 0.03
    assert torch.equal(layer.input_layernorm.weight, torch.ones_like(layer.input_layernorm.weight))


def test_mixed_needs_fsdp(tmp_path):
    cfg = load_config(mixed_recipe(tmp_path, fsdp=None))
    with pytest.raises(ConfigError, match=r"mixed\.yaml: model\.init_device: 'mixed'.*needs FSDP"):
        apply_cross_section_rules(cfg, cuda_available=True)


def test_mixed_refuses_sync_module_states_false(tmp_path):
    cfg = load_config(mixed_recipe(tmp_path, fsdp={"sharding_strategy": "FULL_SHARD", "sync_module_states": False}))
    with pytest.raises(ConfigError, match=r"fsdp_config\.sync_module_states: must be true"):
        apply_cross_section_rules(cfg, cuda_available=False)  # refused before the run reaches the GPUs


def test_unknown_init_device_is_a_config_error(tmp_path):
    path = mixed_recipe(tmp_path, fsdp={"sharding_strategy": "FULL_SHARD"})
    cfg = load_config(path, ["model.init_device=gpu0"])
    with pytest.raises(ConfigError, match=r"model\.init_device: 'gpu0' is not one of cpu, meta, mixed"):
        validate_sections(cfg, cuda_available=True)


def test_mixed_turns_on_sync_module_states(tmp_path):
    cfg = apply_cross_section_rules(load_config(mixed_recipe(tmp_path, fsdp={"sharding_strategy": "FULL_SHARD"})),
                                    cuda_available=True)
    validate_sections(cfg, cuda_available=True)
    assert build_parallelism_config(cfg, cuda_available=True)["fsdp"]["sync_module_states"] is True


def test_mixed_without_cuda_loads_on_every_rank(tmp_path, monkeypatch):
    """On a CPU machine FSDP is ignored, so no rank may be left on meta."""
    cfg = load_config(mixed_recipe(tmp_path, fsdp={"sharding_strategy": "FULL_SHARD"}),
                      [f"tokenizer.name={TINY_TOKENIZER}"])
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build_model(apply_cross_section_rules(cfg), load_tokenizer(str(TINY_TOKENIZER)))
    assert {p.device.type for p in model.model.parameters()} == {"cpu"}
    assert any("init_device 'mixed' needs FSDP" in str(w.message) for w in caught)


def run_ranks(tmp_path: Path, saved_model: Path, strategy: str, ranks: int, port: int) -> list[dict]:
    out = tmp_path / strategy
    subprocess.run([str(Path(sys.executable).with_name("composer")), "-n", str(ranks), "--master_port", str(port),
                    "--stdout", str(tmp_path / "r{rank}.out"), "--stderr", str(tmp_path / "r{rank}.err"),
                    str(REPO / "tests" / "helpers" / "mixed_init.py"), str(out), str(saved_model), strategy],
                   check=True, env={**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"},
                   cwd=REPO)
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(ranks)]


@pytest.mark.slow
@pytest.mark.dist
def test_mixed_init_full_shard_equals_a_full_load(tmp_path, saved_model):
    """2 ranks over gloo: rank 0 loads, rank 1 builds on meta; after FSDP both hold the loaded weights."""
    reports = run_ranks(tmp_path, saved_model, "FULL_SHARD", ranks=2, port=29571)
    print(reports)
    assert [r["built_on"] for r in reports] == [["cpu"], ["meta"]]
    for report in reports:
        assert report["keys_match"] and report["max_abs_diff"] == 0.0, report
        # Bit-exact: the same weights (checked above) through the same kernels on the same batch.
        assert report["loss_sharded"] == report["loss_full"]


@pytest.mark.slow
@pytest.mark.dist
def test_mixed_init_hsdp_equals_a_full_load(tmp_path, saved_model):
    """HYBRID_SHARD on a (2 replicas x 2 shards) mesh: each node's first rank loads, the others get its weights."""
    reports = run_ranks(tmp_path, saved_model, "HYBRID_SHARD", ranks=4, port=29573)
    print(reports)
    assert [r["built_on"] for r in reports] == [["cpu"], ["meta"], ["cpu"], ["meta"]]
    for report in reports:
        assert report["keys_match"] and report["max_abs_diff"] == 0.0, report
        # Bit-exact: the same weights (checked above) through the same kernels on the same batch.
        assert report["loss_sharded"] == report["loss_full"]


def test_llama3_8b_recipe_validates_without_downloading():
    cfg = apply_cross_section_rules(load_config(REPO / "yamls" / "remask_llama3_8b.yaml"), cuda_available=True)
    validate_sections(cfg, cuda_available=True)
    assert cfg.model["pretrained_model_name_or_path"] == "meta-llama/Meta-Llama-3-8B"
    assert cfg.model["init_device"] == "mixed"
    fsdp = build_parallelism_config(cfg, cuda_available=True)["fsdp"]
    assert fsdp["sync_module_states"] is True and fsdp["state_dict_type"] == "sharded"
    assert cfg.global_train_batch_size % 8 == 0
