"""Remove the shared memory that crashed streaming runs left behind, and only that (tests, benchmarks, ops).

streaming's ``clean_stale_shared_memory()`` unlinks every streaming segment on the machine,
including those of a training run or test session going on beside this one: that run's names
disappear, a new dataset elsewhere can take the same prefix, and its resource tracker complains at
exit. Here a segment is removed only when no live process maps it.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

__all__ = ["clean_unused_streaming_shared_memory", "streaming_segments"]

SHM_DIR = Path("/dev/shm")
# streaming names its segments "<6-digit prefix>_<name>" (streaming.base.util.SHM_TO_CLEAN).
STREAMING_SEGMENT = re.compile(r"^\d{6}_(locals|barrier|next_epoch|cache_usage|shard_states|shard_access_times|"
                               r"resume|epoch_shape|epoch_data)$")


def streaming_segments() -> set[str]:
    if not SHM_DIR.is_dir():
        return set()
    return {path.name for path in SHM_DIR.iterdir() if STREAMING_SEGMENT.match(path.name)}


def _mapped_segments() -> set[str]:
    """Names under /dev/shm that some live process has mapped (read from /proc/*/maps)."""
    mapped = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as maps:
                for line in maps:
                    if "/dev/shm/" in line:
                        mapped.add(line.rsplit("/dev/shm/", 1)[1].split()[0])
        except OSError:  # the process ended, or is not ours to read
            continue
    return mapped


def clean_unused_streaming_shared_memory() -> list[str]:
    """Unlink the streaming segments no live process maps; returns their names."""
    unused = sorted(streaming_segments() - _mapped_segments())
    for name in unused:
        with contextlib.suppress(FileNotFoundError):  # another cleaner was first
            (SHM_DIR / name).unlink()
    return unused
