"""Cleaning up after crashed streaming runs never touches the shared memory of a run still going.

The test suites and the benchmarks clean up before they build loaders; on a shared machine a
training run may be going on beside them. streaming's own ``clean_stale_shared_memory()`` unlinks
that run's segments too.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from composer_remask.tools.shared_memory import (
    SHM_DIR,
    clean_unused_streaming_shared_memory,
    streaming_segments,
)

pytestmark = pytest.mark.skipif(not SHM_DIR.is_dir() or not Path("/proc/self/maps").exists(),
                                reason="needs /dev/shm and /proc (Linux)")

# A process that maps the segment (as streaming does), or has only opened it so far.
HOLD = """
import mmap, sys
handle = open(sys.argv[1], "r+b")
if sys.argv[2] == "map":
    mapping = mmap.mmap(handle.fileno(), 0)
    handle.close()
print("holding", flush=True)
sys.stdin.read()
"""


def _free_prefix() -> str:
    taken = {name[:6] for name in streaming_segments()}
    prefix = 900000 + uuid.uuid4().int % 99000
    while f"{prefix:06d}" in taken or f"{prefix + 1:06d}" in taken:
        prefix += 2
    return f"{prefix:06d}"


@pytest.mark.parametrize("how", ["map", "open"])
def test_only_segments_no_live_process_uses_are_removed(how):
    prefix = _free_prefix()
    live, left_behind = SHM_DIR / f"{prefix}_locals", SHM_DIR / f"{int(prefix) + 1:06d}_next_epoch"
    unrelated = SHM_DIR / f"remask-test-{uuid.uuid4().hex}"
    for path in (live, left_behind, unrelated):
        path.write_bytes(b"\0" * 8)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(live), how], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        removed = clean_unused_streaming_shared_memory()
        assert left_behind.name in removed and not left_behind.exists()
        assert live.exists(), f"the segment a live process uses ({how}) was removed"
        assert unrelated.exists(), "a segment that is not streaming's was removed"
    finally:
        holder.communicate("")
        for path in (live, left_behind, unrelated):
            path.unlink(missing_ok=True)
