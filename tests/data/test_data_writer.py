"""The MDS writer: round trips per source, mixing, bad input, atomic output, determinism, remotes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from streaming import Stream, StreamingDataset

from composer_remask.batch import IGNORE_INDEX, PREDICTED_ROLES, ROLE_PAD, ROLE_RESPONSE
from composer_remask.data.dataset import build_dataloader
from composer_remask.data.formats import RoleEncoder
from composer_remask.data.pipeline import ChunkEncoder
from composer_remask.data.shards import read_mds_samples
from composer_remask.data.sources import DataError, RawRecord, SourceSpec
from composer_remask.data.writer import (
    BuildError,
    OutputTarget,
    StreamWeight,
    build_corpus,
    parse_out,
    parse_stream_weight,
    streams_yaml,
)
from composer_remask.tools.fixtures import (
    oasst2_rows,
    reddit_rows,
    tinycot_rows,
    write_jsonl,
)
from tests.helpers.assets import TINY_TOKENIZER
from tests.helpers.role_spans import PATIENCE_S, decoded_spans, expected_spans_of_row

FIXTURE_KINDS = {"tinycot": "tinycot", "oasst2": "oasst2", "oasst2_parquet": "oasst2", "reddit": "reddit",
                 "generic": "jsonl"}


def build(tokenizer, out: Path | str | tuple[str, str], sources: dict[str, tuple[str, Path]], **options) -> dict:
    specs = [SourceSpec(name, kind, str(path)) for name, (kind, path) in sources.items()]
    options.setdefault("progress", False)
    return build_corpus(specs, tokenizer, out if isinstance(out, tuple) else str(out), **options)


def read_rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in path.read_text().splitlines()]


def dataset_files(out: Path) -> dict[str, bytes]:
    """Every file the build wrote for the datasets (shards and index.json), by relative path."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.parent != out}


@pytest.mark.parametrize("source", sorted(FIXTURE_KINDS))
def test_round_trip_source_to_batch_keeps_exact_roles_and_labels(source, asset_tokenizer, fixture_files, tmp_path,
                                                                 fresh_shm):
    kind, path = FIXTURE_KINDS[source], fixture_files[source]
    manifest = build(asset_tokenizer, tmp_path / "out", {source: (kind, path)}, max_seq_len=256)
    rows = read_rows(path)
    assert manifest["sources"][source]["rows_written"] == len(rows)

    spec = build_dataloader({"streams": {source: {"local": str(tmp_path / "out" / source)}}, "shuffle": False,
                             "drop_last": False, "max_seq_len": 256}, asset_tokenizer, device_batch_size=5)
    seen = Counter()
    for batch in spec.dataloader:
        ids, mask, labels, roles = batch["input_ids"], batch["attention_mask"], batch["labels"], batch["token_roles"]
        assert ids.dtype == labels.dtype == mask.dtype == torch.int64 and roles.dtype == torch.int8
        predicted = torch.isin(roles, torch.tensor(PREDICTED_ROLES, dtype=torch.int8))
        assert torch.equal(labels, torch.where(predicted, ids, torch.full_like(ids, IGNORE_INDEX)))
        assert torch.equal(mask.bool(), roles != ROLE_PAD)
        for row in range(ids.shape[0]):
            n = int(mask[row].sum())
            assert torch.all(labels[row, n:] == IGNORE_INDEX) and torch.all(ids[row, n:] == asset_tokenizer.pad_token_id)
            spans = decoded_spans(asset_tokenizer, ids[row, :n].numpy(), roles[row, :n].numpy())
            seen[json.dumps(spans)] += 1
    expected = Counter(json.dumps(expected_spans_of_row(kind, row)) for row in rows)
    assert seen == expected


def test_mix_of_all_plus_limits_is_realized_by_streaming(asset_tokenizer, tmp_path, fresh_shm):
    """The card's all/1000/1000 mix, scaled down to all of 300 + 50 + 50."""
    files = {"tinycot": ("tinycot", write_jsonl(tmp_path / "t.jsonl", tinycot_rows(300))),
             "oasst2": ("oasst2", write_jsonl(tmp_path / "o.jsonl", oasst2_rows(200))),
             "reddit": ("reddit", write_jsonl(tmp_path / "r.jsonl", reddit_rows(120)))}
    out = tmp_path / "out"
    manifest = build(asset_tokenizer, out, files, limits={"oasst2": 50, "reddit": 50}, seed=3)
    written = {name: s["rows_written"] for name, s in manifest["sources"].items()}
    assert written == {"tinycot": 300, "oasst2": 50, "reddit": 50}
    assert manifest["sources"]["oasst2"]["rows_skipped"] == {"over_limit": 150}

    streams = yaml.safe_load((out / "streams.yaml").read_text())["streams"]
    assert streams["oasst2"] == {"local": str(out / "oasst2"), "remote": None, "repeat": 1}
    dataset = StreamingDataset(streams=[Stream(**s) for s in streams.values()], shuffle=True, shuffle_seed=5,
                               batch_size=4)
    assert Counter(sample["source"] for sample in dataset) == Counter(written)


def test_streams_yaml_mixes_by_choose_or_proportion(asset_tokenizer, tmp_path, fresh_shm):
    files = {"tinycot": ("tinycot", write_jsonl(tmp_path / "t.jsonl", tinycot_rows(120))),
             "oasst2": ("oasst2", write_jsonl(tmp_path / "o.jsonl", oasst2_rows(80)))}
    build(asset_tokenizer, tmp_path / "a", files, mix={"oasst2": StreamWeight("choose", 30)})
    streams = yaml.safe_load((tmp_path / "a" / "streams.yaml").read_text())["streams"]
    assert streams["oasst2"]["choose"] == 30 and streams["tinycot"]["repeat"] == 1
    dataset = StreamingDataset(streams=[Stream(**s) for s in streams.values()], shuffle=True, batch_size=4)
    assert Counter(sample["source"] for sample in dataset) == {"tinycot": 120, "oasst2": 30}

    build(asset_tokenizer, tmp_path / "b", files,
          mix={"tinycot": StreamWeight("proportion", 0.75), "oasst2": StreamWeight("proportion", 0.25)})
    streams = yaml.safe_load((tmp_path / "b" / "streams.yaml").read_text())["streams"]
    dataset = StreamingDataset(streams=[Stream(**s) for s in streams.values()], shuffle=True, batch_size=4,
                               epoch_size=400)
    counts = Counter(sample["source"] for sample in dataset)
    assert abs(counts["tinycot"] - 300) <= 4 and abs(counts["oasst2"] - 100) <= 4


def _bad_input_files(tmp_path: Path) -> dict[str, tuple[str, Path, Counter]]:
    """Per source kind: a file mixing good rows with every bad case, and the skip counts it must give."""
    def write(name: str, lines: list[bytes]) -> Path:
        path = tmp_path / name
        path.write_bytes(b"\n".join(lines) + b"\n")
        return path

    good_cot = [json.dumps(r).encode() for r in tinycot_rows(4)]
    long_cot = json.dumps({"prompt": "Count.", "rationale": " ".join(["one two three"] * 80), "target": "3"}).encode()
    cot = write("tinycot.jsonl", [good_cot[0], b'{"prompt": "a", ', b'{"prompt": "a", "target": "1"}',
                                  b'{"prompt": "a", "rationale": "b", "target": 72}',
                                  b'{"prompt": "", "rationale": "b", "target": "1"}', good_cot[1],
                                  b'{"prompt": "a", "rationale": "\xff\xfe", "target": "1"}', long_cot, good_cot[2]])
    good_chat = [json.dumps(r).encode() for r in oasst2_rows(3)]
    long_prompt = json.dumps({"messages": [{"role": "user", "content": "word " * 300},
                                           {"role": "assistant", "content": "ok"}]}).encode()
    long_reply = json.dumps({"messages": [{"role": "user", "content": "Say many words."},
                                          {"role": "assistant", "content": "word " * 300}]}).encode()
    chat = write("oasst2.jsonl", [good_chat[0], b'{"messages": [{"role": "user", "content": "hi"}]}',
                                  b'{"messages": [{"role": "bot", "content": "hi"}]}', long_prompt, long_reply,
                                  good_chat[1]])
    return {
        "tinycot": ("tinycot", cot, Counter(malformed_json=1, missing_field=1, wrong_type=1, empty_text=1,
                                            invalid_utf8=1, too_long_answer=1)),
        "oasst2": ("oasst2", chat, Counter(last_turn_not_assistant=1, unknown_role=1, too_long_no_predicted=1)),
    }


def test_bad_input_raises_naming_file_line_and_field(asset_tokenizer, tmp_path):
    files = _bad_input_files(tmp_path)
    kind, path, _ = files["tinycot"]
    with pytest.raises(DataError, match=rf"^{path}, line 2: malformed JSON"):
        build(asset_tokenizer, tmp_path / "out", {"tinycot": (kind, path)}, max_seq_len=128)
    assert not (tmp_path / "out").exists()


def test_skip_mode_counts_every_bad_row_by_reason_and_accounts_for_every_row(asset_tokenizer, tmp_path):
    files = _bad_input_files(tmp_path)
    manifest = build(asset_tokenizer, tmp_path / "out", {name: (kind, path) for name, (kind, path, _) in files.items()},
                     max_seq_len=128, on_error="skip")
    for name, (_, path, expected_skips) in files.items():
        stats = manifest["sources"][name]
        assert stats["rows_skipped"] == dict(expected_skips)
        lines = [line for line in path.read_bytes().split(b"\n") if line.strip()]
        assert stats["rows_read"] == len(lines)
        assert stats["rows_read"] == stats["rows_written"] + sum(stats["rows_skipped"].values())
        assert len(list(read_mds_samples(str(tmp_path / "out" / name)))) == stats["rows_written"]
    assert manifest["sources"]["oasst2"]["rows_truncated"] == 1
    truncated = [s for s in read_mds_samples(str(tmp_path / "out" / "oasst2")) if len(s["input_ids"]) == 128]
    assert len(truncated) == 1 and truncated[0]["token_roles"][-1] == ROLE_RESPONSE
    tokens = manifest["sources"]["tinycot"]["tokens"]
    assert tokens["total"] == sum(v for k, v in tokens.items() if k != "total") > 0
    assert manifest["totals"]["rows_read"] == sum(s["rows_read"] for s in manifest["sources"].values())


def test_limit_is_drawn_after_validation_so_skipped_rows_do_not_count(asset_tokenizer, tmp_path):
    lines = [json.dumps(r).encode() for r in tinycot_rows(6)] + [b"{oops"] * 4
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"\n".join(lines))
    manifest = build(asset_tokenizer, tmp_path / "out", {"tinycot": ("tinycot", path)}, limits={"tinycot": 5},
                     on_error="skip")
    stats = manifest["sources"]["tinycot"]
    assert stats["rows_written"] == 5 and stats["rows_skipped"] == {"malformed_json": 4, "over_limit": 1}


def test_a_source_with_nothing_left_fails_the_build(asset_tokenizer, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"{oops\n")
    with pytest.raises(BuildError, match="no rows left"):
        build(asset_tokenizer, tmp_path / "out", {"tinycot": ("tinycot", path)}, on_error="skip")


def test_failure_midway_leaves_no_output_and_no_partial_folder(asset_tokenizer, fixture_files, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "response": "r"}\n{"prompt": 3, "response": "r"}\n')
    sources = {"tinycot": ("tinycot", fixture_files["tinycot"]), "bad": ("jsonl", bad)}
    with pytest.raises(DataError, match="line 2, field 'prompt'"):
        build(asset_tokenizer, tmp_path / "out", sources)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_existing_output_is_refused_unless_overwrite(asset_tokenizer, fixture_files, tmp_path):
    out = tmp_path / "out"
    out.mkdir()  # an empty folder is fine
    sources = {"reddit": ("reddit", fixture_files["reddit"])}
    build(asset_tokenizer, out, sources)
    (out / "stale.txt").write_text("from before")
    with pytest.raises(FileExistsError, match="--overwrite"):
        build(asset_tokenizer, out, sources)
    assert (out / "stale.txt").exists()
    build(asset_tokenizer, out, {"tinycot": ("tinycot", fixture_files["tinycot"])}, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "streams.yaml", "tinycot"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_builds_are_byte_identical_across_runs_and_worker_counts(asset_tokenizer, fixture_files, tmp_path):
    sources = {"tinycot": ("tinycot", fixture_files["tinycot"]), "oasst2": ("oasst2", fixture_files["oasst2_parquet"]),
               "generic": ("jsonl", fixture_files["generic"])}
    options = dict(limits={"oasst2": 10}, seed=7, rows_per_chunk=5, shard_size_limit=2048)
    first = build(asset_tokenizer, tmp_path / "one", sources, workers=1, **options)
    build(asset_tokenizer, tmp_path / "again", sources, workers=1, **options)
    build(asset_tokenizer, tmp_path / "two", sources, workers=2, **options)
    files = dataset_files(tmp_path / "one")
    assert sum(name.endswith(".zstd") for name in files) > 3  # several shards per source
    assert dataset_files(tmp_path / "again") == files
    assert dataset_files(tmp_path / "two") == files
    assert json.loads((tmp_path / "two" / "manifest.json").read_text()) == first
    other_seed = build(asset_tokenizer, tmp_path / "seed8", sources, workers=1, **{**options, "seed": 8})
    assert other_seed["sources"]["oasst2"]["rows_written"] == 10
    assert dataset_files(tmp_path / "seed8")["oasst2/index.json"] != files["oasst2/index.json"]


def test_local_remote_pair_uploads_a_complete_copy(asset_tokenizer, fixture_files, tmp_path, fresh_shm):
    local, remote = tmp_path / "local", tmp_path / "remote"
    build(asset_tokenizer, f"{local},{remote}", {"tinycot": ("tinycot", fixture_files["tinycot"])})
    assert dataset_files(remote) == dataset_files(local)
    assert (remote / "manifest.json").read_bytes() == (local / "manifest.json").read_bytes()
    streams = yaml.safe_load((local / "streams.yaml").read_text())["streams"]
    assert streams["tinycot"] == {"local": str(local / "tinycot"), "remote": str(remote / "tinycot"), "repeat": 1}
    # A fresh cache reads everything from the remote.
    dataset = StreamingDataset(remote=str(remote / "tinycot"), local=str(tmp_path / "cache"), batch_size=2)
    assert len(list(dataset)) == len(fixture_files["tinycot"].read_text().splitlines())
    with pytest.raises(FileExistsError, match="remote"):
        build(asset_tokenizer, f"{tmp_path / 'local2'},{remote}", {"tinycot": ("tinycot", fixture_files["tinycot"])})


def test_killed_build_leaves_no_complete_looking_output(tmp_path):
    """SIGKILL a real `remask-data build` midway: --out must not exist (only a hidden partial folder)."""
    rows = tinycot_rows(30000, seed=1)
    source = write_jsonl(tmp_path / "big.jsonl", rows)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "composer_remask.data.cli", "build", "--source", f"tinycot={source}",
               "--tokenizer", str(TINY_TOKENIZER), "--out", str(out), "--no-progress", "--rows-per-chunk", "200",
               "--shard-size-limit", "16kb"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + PATIENCE_S
    shards: list[Path] = []
    while time.monotonic() < deadline and process.poll() is None and not shards:
        shards = list(tmp_path.glob(".out.partial-*/tinycot/shard.*"))
        time.sleep(0.05)
    assert shards, f"the build never got midway: {process.stderr.read().decode() if process.poll() is not None else ''}"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not out.exists()
    partial = list(tmp_path.glob(".out.partial-*"))
    assert len(partial) == 1 and not (partial[0] / "manifest.json").exists()


def test_remote_only_stream_caches_under_a_stable_local(asset_tokenizer, fixture_files, tmp_path, monkeypatch,
                                                        fresh_shm):
    local, remote = tmp_path / "local", tmp_path / "remote"
    build(asset_tokenizer, (str(local), str(remote)), {"reddit": ("reddit", fixture_files["reddit"])})
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    spec = build_dataloader({"streams": {"reddit": {"remote": str(remote / "reddit")}}, "drop_last": False},
                            asset_tokenizer, device_batch_size=8)
    assert sum(batch["input_ids"].shape[0] for batch in spec.dataloader) == 24
    caches = list((tmp_path / "tmp" / "remask-streams").iterdir())
    assert len(caches) == 1 and (caches[0] / "index.json").exists()


def test_output_targets_and_stream_weights_parse_as_documented():
    assert parse_out("corpus") == OutputTarget("corpus", None)
    assert parse_out("corpus,s3://bucket/corpus") == OutputTarget("corpus", "s3://bucket/corpus")
    assert parse_out(("a", "b")) == OutputTarget("a", "b")
    remote_only = parse_out("gs://bucket/corpus/")
    assert remote_only == OutputTarget(None, "gs://bucket/corpus/")
    assert remote_only.stream_paths("tinycot") == {"local": None, "remote": "gs://bucket/corpus/tinycot"}
    text = streams_yaml(remote_only, ["tinycot"], {"tinycot": parse_stream_weight("choose:7")})
    assert yaml.safe_load(text) == {"streams": {"tinycot": {"local": None, "remote": "gs://bucket/corpus/tinycot",
                                                            "choose": 7}}}
    assert parse_stream_weight("repeat:2.5") == StreamWeight("repeat", 2.5)
    assert parse_stream_weight("proportion:0.25") == StreamWeight("proportion", 0.25)
    for bad in ("choose:1.5", "weight:1", "repeat:-1", "choose"):
        with pytest.raises(ValueError, match="stream weight"):
            parse_stream_weight(bad)


def test_build_options_are_checked_before_any_work(asset_tokenizer, fixture_files, tmp_path):
    source = ("tinycot", fixture_files["tinycot"])
    cases = [({"manifest.json": source}, {}, "letters, digits"),
             ({"a": source, "b": source}, {"limits": {"c": 1}}, "--limit names unknown sources"),
             ({"a": source, "b": source}, {"mix": {"a": StreamWeight("proportion", 1)}}, "proportion"),
             ({"a": source}, {"on_error": "ignore"}, "on_error"),
             ({"a": source}, {"max_seq_len": 1}, "max_seq_len"),
             ({"a": source}, {"workers": 0}, "workers")]
    for sources, options, message in cases:
        with pytest.raises(ValueError, match=message):
            build(asset_tokenizer, tmp_path / "out", sources, **options)
    assert not (tmp_path / "out").exists()


class _DiesWhenUnpickled:
    """A payload that kills the worker process that receives it (as the OOM killer would)."""

    def __reduce__(self):
        return (os._exit, (3,))


def test_a_dead_worker_fails_the_build_instead_of_hanging_it(asset_tokenizer):
    records = [RawRecord(1, b'{"prompt": "p", "response": "r"}'), RawRecord(2, _DiesWhenUnpickled())]
    with ChunkEncoder(RoleEncoder(asset_tokenizer), 64, workers=2) as encoder:
        results = encoder.map("jsonl", [records[:1], records[1:]], path="x.jsonl", unit="line")
        assert next(results)[0].input_ids is not None
        with pytest.raises(RuntimeError, match="worker process died"):
            next(results)
