"""Faults and hostile input in the data pipeline: signals, dead parents, corrupt shards, read-only
corpora, inputs inside --out, absurdly nested JSON and non-finite numbers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from composer_remask.data.cli import main
from composer_remask.data.dataset import build_dataloader
from composer_remask.data.shards import read_mds_samples
from composer_remask.data.sources import DataError, SourceSpec
from composer_remask.data.writer import StreamWeight, build_corpus, parse_stream_weight
from composer_remask.tools.fixtures import tinycot_rows, write_jsonl
from tests.helpers.assets import TINY_TOKENIZER
from tests.helpers.role_spans import PATIENCE_S

# ------------------------------------------------------------------------------ processes (/proc)


def _proc_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state, start time) of every process, read from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        table[int(entry)] = (int(fields[1]), fields[0], fields[19])
    return table


def _descendants(root: int) -> dict[int, str]:
    """pid -> start time of every live descendant of ``root`` (start time guards against pid reuse)."""
    table = _proc_table()
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, state, start) in table.items():
            if ppid == parent and pid not in found and state != "Z":
                found[pid] = start
                frontier.append(pid)
    return found


def _still_running(processes: dict[int, str]) -> list[int]:
    table = _proc_table()
    return [pid for pid, start in processes.items()
            if pid in table and table[pid][2] == start and table[pid][1] != "Z"]


def _start_build_with_workers(tmp_path: Path) -> tuple[subprocess.Popen, dict[int, str]]:
    """A real `remask-data build --workers 2`, returned once it is midway with all its helpers up."""
    source = write_jsonl(tmp_path / "big.jsonl", tinycot_rows(60000, seed=1))
    command = [sys.executable, "-m", "composer_remask.data.cli", "build", "--source", f"tinycot={source}",
               "--tokenizer", str(TINY_TOKENIZER), "--out", str(tmp_path / "out"), "--no-progress",
               "--workers", "2", "--rows-per-chunk", "100", "--shard-size-limit", "16kb"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + PATIENCE_S
    helpers: dict[int, str] = {}
    # forkserver + 2 workers + resource tracker, and shards written: the build is midway.
    while time.monotonic() < deadline and process.poll() is None:
        helpers = _descendants(process.pid)
        if len(helpers) >= 4 and list(tmp_path.glob(".out.partial-*/tinycot/shard.*")):
            return process, helpers
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"the build never got midway with its workers up (helpers {helpers}): "
                         f"{process.stderr.read().decode()}")


def _wait_until_gone(processes: dict[int, str]) -> list[int]:
    deadline = time.monotonic() + PATIENCE_S
    while (left := _still_running(processes)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _kill_leftovers(processes: dict[int, str]) -> None:
    """Do not leak a failed test's processes into the rest of the session."""
    for pid in _still_running(processes):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads the process table from /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_cleans_up_like_ctrl_c_and_ends_every_helper_process(signum, tmp_path):
    process, helpers = _start_build_with_workers(tmp_path)
    try:
        process.send_signal(signum)
        status = process.wait()
        stderr = process.stderr.read().decode()
        assert _wait_until_gone(helpers) == []
    finally:
        _kill_leftovers(helpers)
    assert status == 128 + signum, stderr
    assert f"remask-data: error: interrupted by {signum.name}; the partial output was removed" in stderr
    assert "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl"]  # no --out, no .partial folder


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads the process table from /proc")
def test_sigkill_of_the_build_ends_its_workers_and_helpers(tmp_path):
    process, helpers = _start_build_with_workers(tmp_path)
    try:
        process.kill()
        process.wait()
        assert _wait_until_gone(helpers) == []
    finally:
        _kill_leftovers(helpers)
    assert not (tmp_path / "out").exists()
    partial = list(tmp_path.glob(".out.partial-*"))
    assert len(partial) == 1 and not (partial[0] / "manifest.json").exists()


# ------------------------------------------------------------------------------ integrity of shards


@pytest.fixture
def corpus(asset_tokenizer, fixture_files, tmp_path) -> Path:
    out = tmp_path / "corpus"
    build_corpus([SourceSpec("tinycot", "tinycot", str(fixture_files["tinycot"]))], asset_tokenizer, str(out),
                 max_seq_len=128, progress=False, shard_size_limit=4096)
    return out


def _count_rows(loader_section: dict, tokenizer) -> int:
    spec = build_dataloader({**loader_section, "shuffle": False, "drop_last": False}, tokenizer,
                            device_batch_size=4)
    return sum(batch["input_ids"].shape[0] for batch in spec.dataloader)


def _flip_one_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) * 3 // 4] ^= 0x04  # inside a sample's token ids, past the shard header
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("validate_hash", [None, "xxh64"])
def test_a_flipped_bit_in_a_decompressed_shard_stops_training_and_inspect(validate_hash, asset_tokenizer, corpus,
                                                                          fresh_shm, capsys):
    stream = {"local": str(corpus / "tinycot")}
    if validate_hash:
        stream["validate_hash"] = validate_hash
    assert _count_rows({"streams": {"tinycot": stream}}, asset_tokenizer) == 24  # decompresses next to the .zstd
    raw_shards = sorted((corpus / "tinycot").glob("shard.*.mds"))
    assert raw_shards
    _flip_one_bit(raw_shards[0])
    with pytest.raises(ValueError, match=f"{raw_shards[0]}: xxh64 .* corrupt; delete it to have it decompressed "
                                         f"again from {raw_shards[0].name}.zstd"):
        build_dataloader({"streams": {"tinycot": stream}}, asset_tokenizer, device_batch_size=4)
    assert main(["inspect", str(corpus), "--n", "1"]) == 2
    assert str(raw_shards[0]) in capsys.readouterr().err
    raw_shards[0].unlink()  # the remedy the error names
    assert _count_rows({"streams": {"tinycot": stream}}, asset_tokenizer) == 24


def test_a_flipped_bit_in_a_compressed_shard_stops_training_and_inspect(asset_tokenizer, corpus, fresh_shm, capsys):
    zipped = sorted((corpus / "tinycot").glob("shard.*.mds.zstd"))
    _flip_one_bit(zipped[-1])
    with pytest.raises(ValueError, match=str(zipped[-1])):
        build_dataloader({"local": str(corpus / "tinycot")}, asset_tokenizer, device_batch_size=4)
    with pytest.raises(ValueError, match=str(zipped[-1])):
        list(read_mds_samples(str(corpus / "tinycot")))
    assert main(["inspect", str(corpus), "--n", "1"]) == 2
    assert str(zipped[-1]) in capsys.readouterr().err


# ------------------------------------------------------------------------------ read-only corpus


_READ_ONLY_PROBE = """
import json, sys
from composer_remask.data.dataset import build_dataloader
from composer_remask.data.tokenizer import load_tokenizer
tokenizer = load_tokenizer(sys.argv[2])
spec = build_dataloader({"local": sys.argv[1], "shuffle": False, "drop_last": False}, tokenizer, 4)
print(json.dumps(sum(batch["input_ids"].shape[0] for batch in spec.dataloader)))
"""


def _without_permission_overrides() -> None:
    """In the child, before exec: drop the capabilities that let root write through permission bits."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop, cap_dac_override, cap_dac_read_search = 24, 1, 2
    for capability in (cap_dac_override, cap_dac_read_search):
        if libc.prctl(pr_capbset_drop, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.mark.slow  # a child process that imports torch and streaming
def test_a_read_only_corpus_folder_trains_through_a_writable_cache(asset_tokenizer, fixture_files, tmp_path,
                                                                    fresh_shm):
    """The corpus folder cannot be written to: shards are decompressed into a cache instead.

    Root writes through permission bits, so as root the loader runs in a child process without
    the capabilities that allow it (CAP_DAC_OVERRIDE); skipped where they cannot be dropped.
    """
    preexec = None
    if os.geteuid() == 0:
        if not sys.platform.startswith("linux"):
            pytest.skip("running as root, whose writes permission bits do not stop")
        preexec = _without_permission_overrides
        probe = tmp_path / "probe"
        probe.mkdir(mode=0o555)
        touched = subprocess.run(["touch", str(probe / "x")], preexec_fn=preexec, capture_output=True)
        if touched.returncode == 0:
            pytest.skip("running as root, and dropping CAP_DAC_OVERRIDE did not stop writes here")
    corpus = tmp_path / "corpus"
    build_corpus([SourceSpec("tinycot", "tinycot", str(fixture_files["tinycot"]))], asset_tokenizer, str(corpus),
                 max_seq_len=128, progress=False, shard_size_limit=4096)
    before = sorted(p.name for p in (corpus / "tinycot").iterdir())
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    try:
        for path in [corpus, *corpus.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)
        env = {**os.environ, "TMPDIR": str(scratch)}
        result = subprocess.run([sys.executable, "-c", _READ_ONLY_PROBE, str(corpus / "tinycot"),
                                 str(TINY_TOKENIZER)], capture_output=True, text=True, env=env,
                                preexec_fn=preexec)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout.splitlines()[-1]) == 24
        assert sorted(p.name for p in (corpus / "tinycot").iterdir()) == before
        assert list(scratch.rglob("shard.*.mds"))  # decompressed into the cache
    finally:
        for path in [corpus, *corpus.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)


# ------------------------------------------------------------------------------ --overwrite


def test_overwrite_refuses_when_an_input_lies_inside_out(asset_tokenizer, fixture_files, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    source = out / "rows.jsonl"
    source.write_bytes(fixture_files["tinycot"].read_bytes())
    args = ["build", "--source", f"tinycot={source}", "--tokenizer", str(TINY_TOKENIZER), "--out", str(out),
            "--overwrite", "--no-progress"]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert error.startswith("remask-data: error:") and str(source) in error and "inside --out" in error
    assert source.read_bytes() == fixture_files["tinycot"].read_bytes()
    # The tokenizer folder is an input too.
    tokenizer_dir = out / "tokenizer"
    asset_tokenizer.save_pretrained(str(tokenizer_dir))
    with pytest.raises(ValueError, match="inside --out"):
        build_corpus([SourceSpec("tinycot", "tinycot", str(fixture_files["tinycot"]))], str(tokenizer_dir),
                     str(out), overwrite=True, progress=False)
    assert (tokenizer_dir / "tokenizer.json").exists() and source.exists()


# ------------------------------------------------------------------------------ deep JSON


def _deep_rows_file(path: Path, depth: int) -> Path:
    good = json.dumps({"prompt": "p", "rationale": "r", "target": "1"})
    deep = '{"prompt": "p", "rationale": ' + "[" * depth + "]" * depth + ', "target": "1"}'
    path.write_text(f"{good}\n{deep}\n{good}\n")
    return path


@pytest.mark.parametrize("workers", [1, 2])
def test_absurdly_nested_json_is_a_row_error_naming_line_and_field(workers, asset_tokenizer, tmp_path):
    source = _deep_rows_file(tmp_path / "deep.jsonl", 100_000)
    specs = [SourceSpec("tinycot", "tinycot", str(source))]
    with pytest.raises(DataError, match=r"deep.jsonl, line 2, field 'rationale': JSON nested deeper than"):
        build_corpus(specs, asset_tokenizer, str(tmp_path / "raise"), workers=workers, progress=False)
    manifest = build_corpus(specs, asset_tokenizer, str(tmp_path / "skip"), workers=workers, on_error="skip",
                            progress=False)
    assert manifest["sources"]["tinycot"]["rows_skipped"] == {"too_deep": 1}
    assert manifest["sources"]["tinycot"]["rows_written"] == 2


def test_absurdly_nested_json_array_file_names_the_line(asset_tokenizer, tmp_path):
    rows = '[\n{"prompt": "p", "rationale": "r", "target": "1"},\n{"prompt": ' + "[" * 5000 + "]" * 5000 + "}\n]"
    source = tmp_path / "deep.json"
    source.write_text(rows)
    with pytest.raises(DataError, match=r"deep.json, line 3, field 'prompt': JSON nested deeper than"):
        build_corpus([SourceSpec("tinycot", "tinycot", str(source))], asset_tokenizer, str(tmp_path / "o"),
                     on_error="skip", progress=False)


# ------------------------------------------------------------------------------ numbers and exit codes


@pytest.mark.parametrize("weight", ["repeat:nan", "proportion:inf", "repeat:-inf", "choose:nan", "repeat:1e999"])
def test_non_finite_mix_weights_are_refused_by_the_cli_and_the_api(weight, fixture_files, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["build", "--source", f"tinycot={fixture_files['tinycot']}", "--tokenizer", str(TINY_TOKENIZER),
            "--out", str(out), "--mix", f"tinycot={weight}", "--no-progress"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "remask-data build: error: argument --mix" in error and "finite" in error
    assert not out.exists()
    with pytest.raises(ValueError, match="finite"):
        parse_stream_weight(weight)
    kind, _, value = weight.partition(":")
    with pytest.raises(ValueError, match="finite"):
        StreamWeight(kind, float(value))


def test_non_finite_stream_weights_in_a_loader_section_are_refused(asset_tokenizer, corpus):
    for key in ("repeat", "proportion", "choose"):
        section = yaml.safe_load(f"streams: {{tinycot: {{local: {corpus / 'tinycot'}, {key}: .nan}}}}")
        with pytest.raises(ValueError, match=f"stream 'tinycot'.*{key}.*finite"):
            build_dataloader(section, asset_tokenizer, device_batch_size=2)


def test_every_cli_error_is_prog_error_with_exit_status_2(fixture_files, tmp_path, capsys):
    base = ["build", "--source", f"tinycot={fixture_files['tinycot']}", "--tokenizer", str(TINY_TOKENIZER),
            "--no-progress"]
    runtime_errors = [
        ([*base, "--out", str(tmp_path / "a"), "--workers", "0"], "workers"),
        ([*base, "--out", str(tmp_path / "b"), "--rows-per-chunk", "0"], "rows"),
        (["build", "--source", f"tinycot={tmp_path / 'missing.jsonl'}", "--tokenizer", str(TINY_TOKENIZER),
          "--out", str(tmp_path / "c")], "missing.jsonl"),
        (["inspect", str(tmp_path / "nothing-here")], "nothing-here"),
    ]
    for args, named in runtime_errors:
        assert main(args) == 2, args
        error = capsys.readouterr().err
        assert error.startswith("remask-data: error:") and named in error and "Traceback" not in error
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--out", str(tmp_path / "d"), "--limit", "tinycot=-1"])
    assert exit_info.value.code == 2
    assert "remask-data build: error: argument --limit" in capsys.readouterr().err


def test_cancelling_a_writer_with_pending_jobs_prints_no_traceback(tmp_path, caplog):
    """Regression: SIGTERM under load printed concurrent.futures' 'exception calling callback' traceback."""
    import threading

    from streaming import MDSWriter

    from composer_remask.data.writer import cancel_quietly

    writer = MDSWriter(out=str(tmp_path / "mds"), columns={"x": "int"}, max_workers=1)
    release = threading.Event()
    running = writer.executor.submit(release.wait)
    pending = [writer.executor.submit(lambda: None) for _ in range(3)]
    for future in pending:
        future.add_done_callback(writer.exception_callback)  # streaming's callback, as for its uploads
    cancel_quietly(writer)
    release.set()
    running.result()
    assert all(future.cancelled() for future in pending)
    assert not [r for r in caplog.records if r.name == "concurrent.futures"]  # what reached stderr before


# --------------------------------------------------------------------- special files and sizes


def test_a_named_pipe_source_is_refused_before_anything_reads_it(tmp_path):
    """A FIFO was drained by the row count and then blocked the reader forever."""
    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)
    done = subprocess.run([sys.executable, "-m", "composer_remask.data.cli", "build", "--source", f"t=tinycot:{fifo}",
                           "--tokenizer", str(TINY_TOKENIZER), "--out", str(tmp_path / "out"), "--no-progress"],
                          capture_output=True, text=True, timeout=PATIENCE_S, stdin=subprocess.DEVNULL)
    assert done.returncode == 2, done.stderr
    assert f"remask-data: error: {fifo}: not a regular file" in done.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_a_line_over_the_size_bound_is_a_row_error(on_error, asset_tokenizer, tmp_path, monkeypatch):
    from composer_remask.data import sources

    monkeypatch.setattr(sources, "MAX_ROW_BYTES", 4096)
    rows = tinycot_rows(3)
    rows[1] = dict(rows[1], rationale="x " * 10_000)   # ~20 kB: over the bound
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    spec = [SourceSpec("t", "tinycot", str(path))]
    if on_error == "raise":
        with pytest.raises(DataError, match=r"rows\.jsonl, line 2: the line is \d+ bytes, over the 4096") as error:
            build_corpus(spec, asset_tokenizer, str(tmp_path / "out"), max_seq_len=64, progress=False)
        assert error.value.reason == "too_long"
        assert not (tmp_path / "out").exists()
    else:
        manifest = build_corpus(spec, asset_tokenizer, str(tmp_path / "out"), max_seq_len=64, progress=False,
                                on_error="skip")
        stats = manifest["sources"]["t"]
        assert (stats["rows_written"], stats["rows_skipped"]) == (2, {"too_long": 1})


def test_the_same_file_under_two_source_names_is_refused(fixture_files, tmp_path, capsys):
    path = fixture_files["tinycot"]
    link = tmp_path / "again.jsonl"
    link.symlink_to(path)
    status = main(["build", "--source", f"a=tinycot:{path}", "--source", f"b=tinycot:{link}", "--tokenizer",
                   str(TINY_TOKENIZER), "--out", str(tmp_path / "out"), "--no-progress"])
    assert status == 2
    err = capsys.readouterr().err
    assert "are the same file: every row would be written twice" in err
    assert f"--source a={path} and --source b={link}" in err and not (tmp_path / "out").exists()


def test_an_out_that_is_a_mount_point_is_refused_before_the_build(fixture_files, capsys):
    mount = next((m for m in ("/dev/shm", "/proc", "/sys") if os.path.isdir(m) and os.path.ismount(m)), None)
    if mount is None:
        pytest.skip("no mount point to point --out at")
    before = sorted(os.listdir(mount))
    status = main(["build", "--source", f"t=tinycot:{fixture_files['tinycot']}", "--tokenizer", str(TINY_TOKENIZER),
                   "--out", mount, "--no-progress"])
    assert status == 2
    assert f"--out {mount} is a mount point" in capsys.readouterr().err
    assert not [name for name in os.listdir(mount) if name not in before and name.startswith(".")]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads the process table from /proc")
def test_repeated_ctrl_c_neither_cuts_the_cleanup_short_nor_adds_a_traceback(tmp_path):
    """Seen before: a second Ctrl-C sometimes added a KeyboardInterrupt traceback after the cleanup."""
    process, helpers = _start_build_with_workers(tmp_path)
    try:
        for _ in range(5):  # an impatient user: Ctrl-C again while the first one is being handled
            if process.poll() is not None:
                break
            process.send_signal(signal.SIGINT)
            time.sleep(0.02)
        status = process.wait()
        stderr = process.stderr.read().decode()
        assert _wait_until_gone(helpers) == []
    finally:
        _kill_leftovers(helpers)
    assert status == 128 + signal.SIGINT, stderr
    assert "remask-data: error: interrupted by SIGINT; the partial output was removed" in stderr
    assert "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl"]
