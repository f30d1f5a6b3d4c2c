"""Remove the shared memory that crashed streaming runs left behind, and only that (tests, benchmarks, ops).

streaming's ``clean_stale_shared_memory()`` unlinks every streaming segment on the machine,
including those of a training run or test session going on beside this one: that run's names
disappear, a new dataset elsewhere can take the same prefix, and its resource tracker complains at
exit. Here a segment is removed only when it belongs to this user and no live process this user
can see maps it or holds it open. Processes in another PID namespace that share ``/dev/shm`` are not
visible in ``/proc``: do not run a cleanup across such a boundary.
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


def streaming_segments(owned_only: bool = False) -> set[str]:
    """Streaming's segment names in /dev/shm (only this user's with ``owned_only``)."""
    if not SHM_DIR.is_dir():
        return set()
    names = set()
    for path in SHM_DIR.iterdir():
        if STREAMING_SEGMENT.match(path.name):
            with contextlib.suppress(FileNotFoundError):
                if not owned_only or path.stat().st_uid == os.geteuid():
                    names.add(path.name)
    return names


def _segments_in_use() -> set[str]:
    """Names under /dev/shm that a live process maps (``/proc/*/maps``) or holds open (``/proc/*/fd``)."""
    in_use = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):  # the process ended meanwhile, or is another user's
            with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as maps:
                for line in maps:
                    if "/dev/shm/" in line:
                        in_use.add(line.rsplit("/dev/shm/", 1)[1].split()[0])
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("/dev/shm/"):
                        in_use.add(target.removeprefix("/dev/shm/").split()[0])
    return in_use


def clean_unused_streaming_shared_memory() -> list[str]:
    """Unlink this user's streaming segments that no live process uses; returns their names."""
    removed = []
    for name in sorted(streaming_segments(owned_only=True) - _segments_in_use()):
        with contextlib.suppress(FileNotFoundError, PermissionError):  # another cleaner was first
            (SHM_DIR / name).unlink()
            removed.append(name)
    return removed
