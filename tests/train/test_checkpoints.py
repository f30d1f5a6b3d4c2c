"""Checkpoint loads run no code from the file; a save folder left by a crash is repaired for autoresume."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from composer.utils.checkpoint import safe_torch_load

from composer_remask.checkpoints import (
    LATEST_NAME,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    check_before_composer_load,
    load_checkpoint_file,
    recover_save_folder,
    safe_loading,
)
from composer_remask.export import main as export_main
from tests.helpers.checkpoints import WritesAFile, crafted_checkpoint


def composer_like_checkpoint(path: Path, batch: int) -> Path:
    """The shapes a Composer checkpoint holds: tensors, numpy RNG state, timedelta, torch version."""
    import datetime

    import numpy as np

    torch.save({"state": {"model": {"model.w": torch.full((4,), float(batch))},
                          "timestamp": {"total_wall_clock": datetime.timedelta(seconds=batch)},
                          "metadata": {"torch_version": torch.__version__}},
                "rng": [{"numpy": np.random.RandomState(batch).get_state()}]}, path)
    return path


def test_a_crafted_checkpoint_runs_no_code(tmp_path):
    marker = tmp_path / "code-ran"
    evil = crafted_checkpoint(tmp_path / "evil.pt", marker)
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pt: refused.*trust_checkpoint_pickle"):
        load_checkpoint_file(evil)
    # Composer's own loader (autoresume, load_path=) goes through the same check once it is installed.
    with safe_loading(), pytest.raises(UnsafeCheckpointError):
        safe_torch_load(str(evil))
    assert export_main([str(evil), "--out", str(tmp_path / "hf")]) == 2
    assert not marker.exists() and not (tmp_path / "hf").exists()


def test_composer_checkpoint_contents_load_safely(tmp_path):
    path = composer_like_checkpoint(tmp_path / "ep0-ba1-rank0.pt", 1)
    state = load_checkpoint_file(path)
    assert state["state"]["model"]["model.w"].tolist() == [1.0] * 4
    assert check_before_composer_load(path)


def test_sharded_metadata_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / ".metadata").write_bytes(pickle.dumps(WritesAFile(marker)))
    assert export_main([str(folder), "--out", str(tmp_path / "hf")]) == 2
    with pytest.raises(UnsafeCheckpointError):
        check_before_composer_load(folder / ".metadata")
    assert not marker.exists()


def test_truncated_and_empty_files_are_reported_as_corrupt(tmp_path):
    good = composer_like_checkpoint(tmp_path / "good.pt", 3)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    for path in (truncated, tmp_path / "empty.pt"):
        with pytest.raises(CorruptCheckpointError, match=path.name):
            load_checkpoint_file(path)


def test_export_refuses_a_checkpoint_with_a_flipped_byte(tmp_path):
    good = composer_like_checkpoint(tmp_path / "good.pt", 3)
    data = bytearray(good.read_bytes())
    weights_at = bytes(data).index(torch.full((4,), 3.0).numpy().tobytes())
    data[weights_at + 1] ^= 0x10
    flipped = tmp_path / "flipped.pt"
    flipped.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="CRC"):
        load_checkpoint_file(flipped, check_crc=True)


def test_partial_newest_checkpoint_is_moved_aside(tmp_path):
    """kill -9 mid-save: ep0-ba6 is half written, latest still names ep0-ba3."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    composer_like_checkpoint(folder / "ep0-ba3-rank0.pt", 3)
    full = composer_like_checkpoint(tmp_path / "full.pt", 6).read_bytes()
    (folder / "ep0-ba6-rank0.pt").write_bytes(full[: len(full) // 2])
    (folder / LATEST_NAME).symlink_to("ep0-ba3-rank0.pt")
    with pytest.warns(UserWarning, match=r"ep0-ba6-rank0\.pt aside"):
        assert recover_save_folder(folder) == folder / "ep0-ba3-rank0.pt"
    names = sorted(p.name for p in folder.iterdir())
    assert "ep0-ba6-rank0.pt" not in names
    assert any(name.startswith("ep0-ba6-rank0.pt.partial-") for name in names)
    assert os.readlink(folder / LATEST_NAME) == "ep0-ba3-rank0.pt"


def test_truncated_latest_falls_back_to_the_previous_good_one(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    composer_like_checkpoint(folder / "ep0-ba3-rank0.pt", 3)
    (folder / "ep1-ba6-rank0.pt").write_bytes(b"")
    (folder / LATEST_NAME).symlink_to("ep1-ba6-rank0.pt")
    with pytest.warns(UserWarning, match="aside"):
        recover_save_folder(folder)
    assert os.readlink(folder / LATEST_NAME) == "ep0-ba3-rank0.pt"
    assert load_checkpoint_file(folder / LATEST_NAME)["state"]["model"]["model.w"][0] == 3.0


def test_complete_checkpoint_newer_than_latest_becomes_latest(tmp_path):
    """Killed after the file was written but before Composer moved the link: resume from the newer one."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    composer_like_checkpoint(folder / "ep0-ba3-rank0.pt", 3)
    composer_like_checkpoint(folder / "ep0-ba6-rank0.pt", 6)
    (folder / LATEST_NAME).symlink_to("ep0-ba3-rank0.pt")
    assert recover_save_folder(folder) == folder / "ep0-ba6-rank0.pt"
    assert os.readlink(folder / LATEST_NAME) == "ep0-ba6-rank0.pt"


def test_nothing_readable_left_means_a_fresh_start(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "ep0-ba3-rank0.pt").write_bytes(b"\0" * 100)
    (folder / LATEST_NAME).symlink_to("ep0-ba3-rank0.pt")
    with pytest.warns(UserWarning):
        assert recover_save_folder(folder) is None
    assert not (folder / LATEST_NAME).is_symlink()


def test_trusted_loading_is_composer_as_shipped(tmp_path):
    """``trust_checkpoint_pickle: true`` is the documented way out, and it does unpickle fully."""
    marker = tmp_path / "code-ran"
    evil = crafted_checkpoint(tmp_path / "evil.pt", marker)
    with safe_loading(trusted=True):
        safe_torch_load(str(evil))
    assert marker.exists()
