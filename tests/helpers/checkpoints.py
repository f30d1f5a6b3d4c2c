"""A checkpoint file whose unpickling runs code, for the tests that check such files are refused."""

from __future__ import annotations

from pathlib import Path

import torch


class WritesAFile:
    """Unpickling this object runs code: it creates ``marker`` (a stand-in for anything worse)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def crafted_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"state": {"model": {"model.w": torch.zeros(2)}, "x": WritesAFile(marker)}, "rng": None}, path)
    return path
