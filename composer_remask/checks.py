"""The one check behind every float option (and the one behind every output path): the Python API,
the recipes and the command lines.

``nan < 0`` is false, so a plain range check lets NaN through and a run trains a NaN model that
exits 0. Every float argument goes through :func:`finite_number`, and a whole recipe through
:func:`non_finite_numbers`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

__all__ = ["finite_number", "non_finite_numbers", "blocking_ancestor"]


def finite_number(value: object, what: str, *, low: float | None = None, high: float | None = None,
                  low_open: bool = False, high_open: bool = False) -> float:
    """``value`` (a number or its text) as a float, finite and within the bounds given.

    ``low``/``high`` are inclusive unless ``low_open``/``high_open``. Booleans, non-numbers, NaN and
    infinities are refused with ``"{what}: expected a finite number, got ..."``; a value out of
    range with ``"{what}: must be in [low, high], got ..."``.
    """
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected a finite number, got {value!r}")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected a finite number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{what}: expected a finite number, got {value!r}")
    below = low is not None and (number <= low if low_open else number < low)
    above = high is not None and (number >= high if high_open else number > high)
    if below or above:
        raise ValueError(f"{what}: must be {_interval(low, high, low_open, high_open)}, got {number:g}")
    return number


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    return f"{'<' if high_open else '<='} {high:g}"


def non_finite_numbers(tree: Any, prefix: str = "") -> list[tuple[str, float]]:
    """Every NaN or infinite float in a nested mapping/list (a resolved recipe), with its dotted key.

    No option of a recipe takes a non-finite value (YAML ``.nan``, ``inf``).
    """
    if isinstance(tree, float):
        return [] if math.isfinite(tree) else [(prefix, tree)]
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return []
    found = []
    for key, value in items:
        found += non_finite_numbers(value, f"{prefix}.{key}" if prefix else str(key))
    return found


def blocking_ancestor(path: str | Path) -> Path | None:
    """What stops ``path`` (a file or folder to create, or to write into) from being written, checked
    before any work: the nearest existing path at or above it when that is a file or a folder this
    process cannot write; ``None`` when nothing does."""
    path = Path(path)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None or (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
        return None
    return existing
