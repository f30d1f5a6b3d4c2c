"""Lilith under HSDP: replicas of the same shards are counted once, so the step equals whole tensors."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from composer_remask.optim import Lilith
from composer_remask.train import ConfigError, load_config
from composer_remask.train.builders import build_optimizer, validate_sections
from composer_remask.train.transforms import apply_cross_section_rules
from tests.helpers.lilith_cases import free_port, lilith_rtol, seeded_tensors, whole_tensor_steps
from tests.helpers.recipes import REPO

pytestmark = pytest.mark.dist


def _replica_worker(rank: int, port: int, replicas: int, out: dict) -> None:
    """Two ranks that are two replicas of one whole-tensor shard (replicate degree 2, shard degree 1)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        params = [torch.nn.Parameter(t.clone()) for t in seeded_tensors(0)]
        optimizer = Lilith(params, lr=0.05, sharded=True, replicas=replicas)
        for step in range(3):
            for param, grad in zip(params, seeded_tensors(100 + step)):
                param.grad = grad.clone()
            optimizer.step()
        out[rank] = [p.detach().clone() for p in params]
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.parametrize("replicas", [2, 1])
def test_replicated_shards_match_whole_tensors_only_when_counted_once(replicas):
    """replicas=2 is exact; replicas=1 counts the (1,) tensor as 2 elements and gives it a trust ratio."""
    expected = whole_tensor_steps()
    out = mp.Manager().dict()
    mp.spawn(_replica_worker, args=(free_port(), replicas, out), nprocs=2, join=True)
    for rank in range(2):
        matches = [torch.allclose(got, want, rtol=lilith_rtol(3), atol=0) for got, want in zip(out[rank], expected)]
        assert all(matches) == (replicas == 2), matches


def test_hsdp_recipe_builds_lilith_with_the_replicate_degree():
    cfg = load_config(REPO / "yamls" / "tiny_cpu.yaml", [
        "fsdp_config.sharding_strategy=HYBRID_SHARD", "fsdp_config.data_parallel_shard_degree=8",
        "fsdp_config.data_parallel_replicate_degree=2"])
    cfg = apply_cross_section_rules(cfg, cuda_available=True)
    validate_sections(cfg, cuda_available=True)
    optimizer = build_optimizer(cfg, torch.nn.Linear(2, 2))
    assert (optimizer.sharded, optimizer.replicas) == (True, 2)


def test_hsdp_without_a_replicate_degree_is_refused():
    """Composer would quietly run FULL_SHARD instead."""
    cfg = load_config(REPO / "yamls" / "tiny_cpu.yaml", ["fsdp_config.sharding_strategy=HYBRID_SHARD"])
    with pytest.raises(ConfigError, match=r"data_parallel_replicate_degree: HYBRID_SHARD is not supported without"):
        validate_sections(cfg, cuda_available=True)


def test_16gpu_run_file_parameters_validate_as_hsdp(tmp_path):
    import yaml

    from composer_remask.train.builders import build_parallelism_config

    recipe = tmp_path / "parameters.yaml"
    recipe.write_text(yaml.safe_dump(yaml.safe_load((REPO / "yamls/mcli/remask_3b_16gpu.yaml").read_text())["parameters"]))
    cfg = load_config(recipe)
    validate_sections(cfg, cuda_available=True)
    fsdp = build_parallelism_config(cfg, cuda_available=True)["fsdp"]
    assert (fsdp["sharding_strategy"], fsdp["data_parallel_shard_degree"], fsdp["data_parallel_replicate_degree"]) == (
        "HYBRID_SHARD", 8, 2)
