"""Seeded tensors, the whole-tensor reference steps and a free port for the multi-process Lilith tests."""

from __future__ import annotations

import socket

import torch

SHAPES = [(4, 6), (6,), (1,)]  # a matrix, a vector, and a (1,) tensor whose ratio is skipped
# Float64 roundings one Lilith step adds to an element, relative: ~20 (trust ratio, both moments, the
# second moment, the normalised update, decay) plus the trust ratio's two norms, each a sum of at most
# 24 elements (24 ulps each).
STEP_ULPS = 20 + 2 * 24


def lilith_rtol(steps: int) -> float:
    """Two float64 routes to ``steps`` Lilith steps (sharded and whole, or Lilith and the formulas):
    each rounds by at most ``STEP_ULPS`` per step, relative."""
    return 2 * steps * STEP_ULPS * torch.finfo(torch.float64).eps


def seeded_tensors(seed: int):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in SHAPES]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def whole_tensor_steps(steps: int = 3) -> list[torch.Tensor]:
    """Lilith (lr 0.05) on the unsharded tensors for ``steps`` seeded gradients: the reference."""
    from composer_remask.optim import Lilith

    whole = [torch.nn.Parameter(t) for t in seeded_tensors(0)]
    optimizer = Lilith(whole, lr=0.05)
    for step in range(steps):
        for param, grad in zip(whole, seeded_tensors(100 + step)):
            param.grad = grad
        optimizer.step()
    return [p.detach() for p in whole]
