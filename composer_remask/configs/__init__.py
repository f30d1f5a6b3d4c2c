"""Model configs shipped with the package, so recipes and checks can build architectures offline."""

from __future__ import annotations

from pathlib import Path

__all__ = ["CONFIGS_DIR", "config_dir"]

CONFIGS_DIR = Path(__file__).resolve().parent


def config_dir(name: str) -> Path:
    """The folder holding ``config.json`` for ``name`` (usable as ``pretrained_model_name_or_path``)."""
    folder = CONFIGS_DIR / name
    if not (folder / "config.json").is_file():
        known = sorted(p.name for p in CONFIGS_DIR.iterdir() if (p / "config.json").is_file())
        raise FileNotFoundError(f"no shipped model config {name!r}; known: {', '.join(known)}")
    return folder
