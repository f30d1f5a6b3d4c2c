"""A run folder records its recipe: autoresume refuses another recipe's run and leaves a finished run alone."""

from __future__ import annotations

import json

import pytest
import torch

from composer_remask.train import load_config
from composer_remask.train import run as run_module
from composer_remask.train.config import ConfigError
from composer_remask.train.identity import IDENTITY_NAME, write_identity
from tests.helpers.recipes import TINY_RECIPE, tiny_overrides


@pytest.fixture
def reached_data(monkeypatch) -> list[str]:
    """Stop the run where the data would be built; the list says whether it got there."""
    reached: list[str] = []

    def stop(*args, **kwargs):
        reached.append("data")
        raise ConfigError("stopped where the data is built")

    monkeypatch.setattr(run_module, "build_loaders", stop)
    monkeypatch.setattr(run_module, "build_model", stop)
    return reached


def _run_folder(sample_corpus, tmp_path, checkpoint: str | None):
    """The tiny recipe's overrides and its save folder, holding ``checkpoint`` (a complete torch.save file)."""
    overrides = tiny_overrides(sample_corpus, tmp_path / "run")
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    if checkpoint:
        torch.save({"state": {}}, folder / checkpoint)
    return overrides, folder


def test_autoresume_into_another_recipes_run_is_refused(sample_corpus, tmp_path, capsys, reached_data):
    overrides, folder = _run_folder(sample_corpus, tmp_path, "ep1-ba12-rank0.pt")
    write_identity(folder, load_config(TINY_RECIPE, [*overrides, "optimizer.lr=0.001"]))
    summary = folder / "summary.json"
    summary.write_text('{"batches": 12}')
    assert run_module.main([str(TINY_RECIPE), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: ") and "Traceback" not in err
    assert str(folder / IDENTITY_NAME) in err and "save_folder" in err
    assert "optimizer.lr: 0.001 there, 0.002 here" in err
    assert err.count("sha256 ") == 2
    assert "another save_folder or run_name" in err and "delete" in err
    assert reached_data == [] and summary.read_text() == '{"batches": 12}'
    # What may change on resume does not make it another run.
    assert run_module.main([str(TINY_RECIPE), *overrides, "optimizer.lr=0.001", "max_duration=5ep",
                            "save_interval=2ep", "console_log_interval=3ba"]) == 2
    assert reached_data == ["data"]


def test_a_finished_run_says_so_and_trains_nothing(sample_corpus, tmp_path, capsys, reached_data):
    overrides, folder = _run_folder(sample_corpus, tmp_path, "ep3-ba36-rank0.pt")  # max_duration: 3ep
    write_identity(folder, load_config(TINY_RECIPE, overrides))
    summary = folder / "summary.json"
    summary.write_text(json.dumps({"batches": 36, "wall_seconds": 100.0}))
    assert run_module.main([str(TINY_RECIPE), *overrides]) == 0
    out = capsys.readouterr().out
    assert "already finished" in out and "ep3-ba36-rank0.pt" in out and "Nothing was trained" in out
    assert reached_data == [] and json.loads(summary.read_text()) == {"batches": 36, "wall_seconds": 100.0}
    assert run_module.main([str(TINY_RECIPE), *overrides, "max_duration=36ba"]) == 0
    # A longer max_duration trains on.
    assert run_module.main([str(TINY_RECIPE), *overrides, "max_duration=4ep"]) == 2
    assert reached_data == ["data"]


def test_a_folder_from_before_identities_resumes_with_one_warning(sample_corpus, tmp_path, reached_data):
    overrides, folder = _run_folder(sample_corpus, tmp_path, "ep1-ba12-rank0.pt")
    with pytest.warns(UserWarning, match=f"carries no {IDENTITY_NAME}"):
        assert run_module.main([str(TINY_RECIPE), *overrides]) == 2
    assert reached_data == ["data"]
    assert (folder / IDENTITY_NAME).is_file()  # recorded from now on: the next resume is checked
    assert run_module.main([str(TINY_RECIPE), *overrides, "algorithms.remask.mask_prob=0.2"]) == 2
    assert reached_data == ["data"]


def test_a_folder_without_checkpoints_takes_the_new_runs_identity(sample_corpus, tmp_path, reached_data):
    overrides, folder = _run_folder(sample_corpus, tmp_path, None)
    write_identity(folder, load_config(TINY_RECIPE, [*overrides, "optimizer.lr=0.001"]))
    assert run_module.main([str(TINY_RECIPE), *overrides]) == 2
    assert reached_data == ["data"]
    recorded = json.loads((folder / IDENTITY_NAME).read_text())
    assert recorded["identity"]["optimizer"]["lr"] == 0.002


@pytest.mark.dist
@pytest.mark.slow
def test_every_process_of_a_launch_stops_at_a_finished_run(sample_corpus, tmp_path):
    """Rank 0 alone used to stop; the other rank waited for it until dist_timeout."""
    import shutil
    import sys
    from pathlib import Path

    from tests.helpers.recipes import run_train

    overrides, folder = _run_folder(sample_corpus, tmp_path, "ep3-ba36-rank0.pt")
    write_identity(folder, load_config(TINY_RECIPE, overrides))
    (folder / "summary.json").write_text(json.dumps({"batches": 36}))
    composer = shutil.which("composer") or str(Path(sys.executable).parent / "composer")
    done = run_train([str(TINY_RECIPE), *overrides, "dist_timeout=120"], cwd=tmp_path,
                     launcher=[composer, "-n", "2", "--stdout", str(tmp_path / "rank{rank}.out"),
                               "--stderr", str(tmp_path / "rank{rank}.err")])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # Rank 0 prints through the launcher, rank 1 to its file: both stopped on the same verdict.
    assert "already finished" in done.stdout and "already finished" in (tmp_path / "rank1.out").read_text()
