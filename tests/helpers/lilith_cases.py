"""Seeded tensors and a free port for the Lilith tests that run several gloo processes."""

from __future__ import annotations

import socket

import torch

SHAPES = [(4, 6), (6,), (1,)]  # a matrix, a vector, and a (1,) tensor whose ratio is skipped


def seeded_tensors(seed: int):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in SHAPES]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
