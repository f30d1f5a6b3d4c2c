"""Lilith on FSDP-style shards (two gloo processes) equals Lilith on the whole tensors."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from composer_remask.optim import Lilith
from tests.helpers.lilith_cases import free_port, lilith_rtol, seeded_tensors, whole_tensor_steps

pytestmark = pytest.mark.dist

def _shard(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    """FSDP-like: the flattened tensor split in two contiguous halves (rank 1 may get nothing)."""
    flat = tensor.reshape(-1)
    half = (flat.numel() + 1) // 2
    return flat[:half].clone() if rank == 0 else flat[half:].clone()


def _worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        params = [torch.nn.Parameter(_shard(t, rank)) for t in seeded_tensors(0)]
        optimizer = Lilith(params, lr=0.05, sharded=True)
        for step in range(3):
            for param, grad in zip(params, seeded_tensors(100 + step)):
                shard = _shard(grad, rank)
                param.grad = shard if shard.numel() else None
            optimizer.step()
        out[rank] = [p.detach().clone() for p in params]
    finally:
        torch_dist.destroy_process_group()


def test_sharded_lilith_matches_whole_tensors():
    whole = whole_tensor_steps()
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(free_port(), out), nprocs=2, join=True)
    for index, param in enumerate(whole):
        gathered = torch.cat([out[0][index], out[1][index]])
        torch.testing.assert_close(gathered, param.reshape(-1), rtol=lilith_rtol(3), atol=0)  # 3 steps


def test_shards_without_sharded_flag_differ():
    """Guard: per-shard norms give a different trust ratio, which the flag exists to avoid."""
    whole = torch.nn.Parameter(seeded_tensors(0)[0])
    half = torch.nn.Parameter(_shard(seeded_tensors(0)[0], 0))
    whole_opt, half_opt = Lilith([whole], lr=0.05), Lilith([half], lr=0.05)
    for step in range(3):
        grad = seeded_tensors(100 + step)[0]
        whole.grad, half.grad = grad, _shard(grad, 0)
        whole_opt.step()
        half_opt.step()
    difference = (half.detach() - whole.detach().reshape(-1)[: half.numel()]).abs().max()
    assert difference > 1e-6
