"""MDS writer: sources -> one MDS dataset per source, a manifest, and a ready ``streams:`` block.

Layout of ``--out``::

    OUT/<source>/index.json, shard.00000.mds.zstd, ...   columns input_ids (int32), token_roles (int8), source
    OUT/manifest.json    rows read / written / skipped by reason / truncated, tokens per role, tokenizer
    OUT/streams.yaml     a ``streams:`` block mixing the sources, to paste under ``train_loader:``

The build writes into a hidden temporary folder next to OUT and renames it into place at the end,
so an interrupted build never leaves a complete-looking OUT. Ctrl-C, SIGTERM and SIGHUP remove the
temporary folder and end the workers; after a SIGKILL the workers end themselves, and a stale
``.OUT.partial-*`` folder stays behind (delete it). With a remote (``local,remote`` pair or an object-store URL),
files are uploaded after the local build, each dataset's ``index.json`` after its shards and
``manifest.json`` last: a remote is complete when it has a manifest.

Paths in ``streams.yaml`` are ``--out`` as given: a relative ``--out`` gives paths relative to the
working directory of the build (run training from there, or pass an absolute ``--out``).

Same inputs and options give byte-identical shards, whatever the number of worker processes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import numpy as np

from composer_remask.batch import ROLE_NAMES
from composer_remask.checks import finite_number
from composer_remask.data.formats import RoleEncoder
from composer_remask.data.manifest import MANIFEST_NAME, vocabulary_hash
from composer_remask.data.pipeline import ChunkEncoder, RowOutcome, chunked, termination_raises_interrupt
from composer_remask.data.sources import SOURCE_NAME_PATTERN, SourceSpec, choose_rows, open_records

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

MDS_COLUMNS = {"input_ids": "ndarray:int32", "token_roles": "ndarray:int8", "source": "str"}
COMPRESSION = "zstd"
HASHES = ["sha1", "xxh64"]  # MDSWriter wants them sorted
STREAMS_NAME = "streams.yaml"
MANIFEST_VERSION = 1
OVER_LIMIT = "over_limit"  # skip reason: valid row not drawn by --limit
ON_ERROR_CHOICES = ("raise", "skip")
WEIGHT_KINDS = ("repeat", "choose", "proportion")


class BuildError(ValueError):
    """The build cannot produce a usable corpus (e.g. a source with no rows left)."""


@dataclass(frozen=True)
class StreamWeight:
    """How a source is mixed by StreamingDataset: ``repeat`` (float), ``choose`` (int) or ``proportion``."""

    kind: str = "repeat"
    value: float = 1

    def __post_init__(self) -> None:
        what = f"stream weight {self.kind}:{self.value}"
        if self.kind not in WEIGHT_KINDS:
            raise ValueError(f"{what}: expected one of {', '.join(k + ':N' for k in WEIGHT_KINDS)}")
        number = finite_number(self.value, what, low=0.0)
        if self.kind == "choose" and number != int(number):
            raise ValueError(f"{what}: expected a non-negative {'integer' if self.kind == 'choose' else 'number'}")
        object.__setattr__(self, "value", int(number) if self.kind == "choose" else number)

    def as_yaml(self) -> dict[str, float | int]:
        return {self.kind: int(self.value) if self.kind == "choose" else self.value}


def parse_stream_weight(text: str) -> StreamWeight:
    """``repeat:2``, ``choose:1000`` or ``proportion:0.25``."""
    kind, _, value = text.partition(":")
    if kind not in WEIGHT_KINDS or not value:
        raise ValueError(f"stream weight {text!r}: expected one of {', '.join(k + ':N' for k in WEIGHT_KINDS)}")
    return StreamWeight(kind, finite_number(value, f"stream weight {text!r}"))


@dataclass(frozen=True)
class OutputTarget:
    """Where the corpus goes: a final local folder, a remote, or both."""

    local: str | None  # None: remote only, built in a temporary folder that is removed afterwards
    remote: str | None

    def stream_paths(self, name: str) -> dict[str, str | None]:
        return {"local": None if self.local is None else os.path.join(self.local, name),
                "remote": None if self.remote is None else _join_remote(self.remote, name)}


def parse_out(out: str | Sequence[str]) -> OutputTarget:
    """``DIR``; ``LOCAL,REMOTE`` (or a 2-sequence), as MDSWriter takes it; or a URL like ``s3://b/p``."""
    if not isinstance(out, str):
        if len(out) != 2:
            raise ValueError(f"--out {out!r}: expected DIR, LOCAL,REMOTE or a URL")
        return OutputTarget(str(out[0]), str(out[1]))
    if "," in out:
        local, remote = (part.strip() for part in out.split(",", 1))
        if not local or not remote:
            raise ValueError(f"--out {out!r}: expected LOCAL,REMOTE")
        return OutputTarget(local, remote)
    if urlparse(out).scheme:
        return OutputTarget(None, out)
    return OutputTarget(out, None)


def _join_remote(remote: str, name: str) -> str:
    return f"{remote.rstrip('/')}/{name}" if urlparse(remote).scheme else os.path.join(remote, name)


@dataclass
class SourceStats:
    """Counts for one source, as written to the manifest."""

    kind: str
    path: str
    limit: int | None
    rows_read: int = 0
    rows_written: int = 0
    rows_truncated: int = 0
    rows_skipped: Counter = field(default_factory=Counter)
    tokens_per_role: np.ndarray = field(default_factory=lambda: np.zeros(4, np.int64))
    max_tokens: int = 0
    origins: Counter = field(default_factory=Counter)

    def add_written(self, outcome: RowOutcome) -> None:
        assert outcome.token_roles is not None
        self.rows_written += 1
        self.rows_truncated += outcome.truncated
        self.tokens_per_role += np.bincount(outcome.token_roles, minlength=4)[:4]
        self.max_tokens = max(self.max_tokens, len(outcome.token_roles))
        if outcome.origin is not None:
            self.origins[outcome.origin] += 1

    def to_json(self) -> dict[str, Any]:
        tokens = {ROLE_NAMES[role]: int(count) for role, count in enumerate(self.tokens_per_role)}
        report: dict[str, Any] = {
            "kind": self.kind, "path": self.path, "limit": self.limit,
            "rows_read": self.rows_read, "rows_written": self.rows_written,
            "rows_skipped": dict(sorted(self.rows_skipped.items())),
            "rows_truncated": self.rows_truncated,
            "tokens": {"total": int(self.tokens_per_role.sum()), **tokens},
            "max_tokens": self.max_tokens,
        }
        if self.origins:
            report["origins"] = dict(sorted(self.origins.items()))
        return report


def build_corpus(
    sources: Sequence[SourceSpec],
    tokenizer: PreTrainedTokenizerBase | str,
    out: str | Sequence[str],
    *,
    max_seq_len: int = 256,
    limits: Mapping[str, int] | None = None,
    mix: Mapping[str, StreamWeight] | None = None,
    seed: int = 0,
    on_error: str = "raise",
    overwrite: bool = False,
    workers: int = 1,
    progress: bool | None = None,
    rows_per_chunk: int = 1000,
    shard_size_limit: int | str = 1 << 26,
) -> dict[str, Any]:
    """Build the corpus (see module docstring) and return the manifest.

    ``tokenizer`` is a loaded fast tokenizer that already has ReMask's tags, or a name/folder
    (loaded with ``composer_remask.data.tokenizer.load_tokenizer``). ``limits`` keeps N rows of a
    source, drawn with ``seed`` among the rows that would be written; ``mix`` sets each source's
    weight in ``streams.yaml`` (default ``repeat: 1``). ``on_error="skip"`` skips and counts bad rows instead of raising
    ``DataError``. ``progress=None`` shows a bar when stderr is a terminal.
    """
    limits, mix = dict(limits or {}), dict(mix or {})
    _check_arguments(sources, limits, mix, on_error, max_seq_len, rows_per_chunk, workers)
    target = parse_out(out)
    _refuse_inputs_inside_out(sources, tokenizer if isinstance(tokenizer, str) else tokenizer.name_or_path, target)
    with termination_raises_interrupt():
        return _build(sources, tokenizer, target, max_seq_len=max_seq_len, limits=limits, mix=mix, seed=seed,
                      on_error=on_error, overwrite=overwrite, workers=workers, progress=progress,
                      rows_per_chunk=rows_per_chunk, shard_size_limit=shard_size_limit)


def _build(sources: Sequence[SourceSpec], tokenizer: PreTrainedTokenizerBase | str, target: OutputTarget, *,
           max_seq_len: int, limits: dict[str, int], mix: dict[str, StreamWeight], seed: int, on_error: str,
           overwrite: bool, workers: int, progress: bool | None, rows_per_chunk: int,
           shard_size_limit: int | str) -> dict[str, Any]:
    if isinstance(tokenizer, str):
        from composer_remask.data.tokenizer import load_tokenizer  # imports transformers: only when needed

        tokenizer_name, tokenizer = tokenizer, load_tokenizer(tokenizer)
        if not tokenizer.is_fast:
            raise ValueError(f"{tokenizer_name}: no fast tokenizer available")
    else:
        tokenizer_name = tokenizer.name_or_path
    encoder = RoleEncoder(tokenizer)
    _refuse_non_empty(target, overwrite)

    final = None if target.local is None else Path(target.local)
    staging: Path | None = None
    try:
        if final is not None:
            final.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
            staging.chmod(0o777 & ~_current_umask())  # mkdtemp's 0700 would otherwise stick to OUT
        else:
            staging = Path(tempfile.mkdtemp(prefix="remask-data-"))
        stats: dict[str, SourceStats] = {}
        with ChunkEncoder(encoder, max_seq_len, workers) as chunk_encoder:
            for spec in sources:
                stats[spec.name] = _write_source(
                    spec, chunk_encoder, staging / spec.name, limit=limits.get(spec.name), seed=seed,
                    on_error=on_error, progress=progress, rows_per_chunk=rows_per_chunk,
                    shard_size_limit=shard_size_limit)
        manifest = _manifest(tokenizer, tokenizer_name, max_seq_len, stats, seed=seed, on_error=on_error,
                             limits=limits, mix=mix, shard_size_limit=shard_size_limit)
        (staging / MANIFEST_NAME).write_text(
            json.dumps(manifest, indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")
        (staging / STREAMS_NAME).write_text(streams_yaml(target, [s.name for s in sources], mix), encoding="utf-8")
        if final is not None:
            _move_into_place(staging, final, overwrite)
            staging = final
        if target.remote is not None:
            _upload(staging, target.remote, [s.name for s in sources])
    except BaseException:
        if staging is not None and staging != final:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if final is None:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_arguments(sources: Sequence[SourceSpec], limits: dict, mix: dict, on_error: str,
                     max_seq_len: int, rows_per_chunk: int, workers: int) -> None:
    names = [spec.name for spec in sources]
    if not names:
        raise ValueError("no sources given")
    bad_names = [name for name in names if not SOURCE_NAME_PATTERN.match(name)]
    if bad_names:
        raise ValueError(f"source names must be letters, digits, '_' or '-': {bad_names}")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"duplicate source names: {duplicates}")
    for option, values in (("--limit", limits), ("--mix", mix)):
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError(f"{option} names unknown sources {unknown}; sources are {names}")
    if any(limit < 0 for limit in limits.values()):
        raise ValueError(f"limits must be >= 0: {limits}")
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
    if rows_per_chunk < 1:
        raise ValueError(f"rows_per_chunk must be >= 1, got {rows_per_chunk}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    proportional = [weight.kind == "proportion" for weight in mix.values()]
    if any(proportional) and not (all(proportional) and len(mix) == len(names)):
        raise ValueError("StreamingDataset mixes either by proportion for every source or by "
                         "repeat/choose: give proportion:P for all sources or for none")
    _refuse_repeated_files(sources)  # last: the option checks above name their own mistakes first


def _refuse_repeated_files(sources: Sequence[SourceSpec]) -> None:
    """One file under two source names would write each of its rows twice."""
    seen: dict[tuple[int, int], SourceSpec] = {}
    for spec in sources:
        try:
            info = os.stat(spec.path)
        except OSError:
            continue  # a hub dataset name, or a missing file (reported when it is opened)
        first = seen.setdefault((info.st_dev, info.st_ino), spec)
        if first is not spec:
            raise ValueError(f"--source {first.name}={first.path} and --source {spec.name}={spec.path} are the same "
                             "file: every row would be written twice; give it once")


def _refuse_inputs_inside_out(sources: Sequence[SourceSpec], tokenizer_name_or_dir: str,
                              target: OutputTarget) -> None:
    """An input inside ``--out`` would be deleted by ``--overwrite`` (and mixed into the corpus folder)."""
    if target.local is None:
        return
    out = Path(os.path.realpath(target.local))
    inputs = [(f"--source {spec.name}={spec.path}", spec.path) for spec in sources]
    inputs.append((f"--tokenizer {tokenizer_name_or_dir}", tokenizer_name_or_dir))
    for option, path in inputs:
        if os.path.exists(path) and Path(os.path.realpath(path)).is_relative_to(out):
            raise ValueError(f"{option}: the input lies inside --out {target.local}, which the build replaces; "
                             "move it out or choose another --out")


def _refuse_non_empty(target: OutputTarget, overwrite: bool) -> None:
    if target.local is not None:
        local = Path(target.local)
        if local.exists() and not local.is_dir():
            raise FileExistsError(f"--out {local} exists and is not a folder")
        if local.is_dir() and os.path.ismount(local):
            raise ValueError(f"--out {local} is a mount point: the build writes beside --out and renames the result "
                             f"into place, which a mount point cannot take; use a folder inside it, e.g. "
                             f"{local / 'corpus'}")
        if local.is_dir() and any(local.iterdir()) and not overwrite:
            raise FileExistsError(f"--out {local} is not empty; pass --overwrite to replace it")
    if target.remote is not None and not overwrite and _remote_has_files(target.remote):
        raise FileExistsError(f"remote {target.remote} is not empty; pass --overwrite to write over it")


def _remote_has_files(remote: str) -> bool:
    if not urlparse(remote).scheme:
        return os.path.isdir(remote) and bool(os.listdir(remote))
    from streaming.base.storage.upload import CloudUploader

    probe = tempfile.mkdtemp(prefix="remask-data-probe-")
    try:
        uploader = CloudUploader.get((probe, remote), keep_local=True, exist_ok=True)
        return bool(uploader.list_objects())
    except NotImplementedError:
        return False  # this store cannot list; nothing to check against
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def _write_source(spec: SourceSpec, chunk_encoder: ChunkEncoder, dataset_dir: Path, *, limit: int | None,
                  seed: int, on_error: str, progress: bool | None, rows_per_chunk: int,
                  shard_size_limit: int | str) -> SourceStats:
    from streaming import MDSWriter
    from tqdm import tqdm

    reader = open_records(spec.path)
    stats = SourceStats(spec.kind, spec.path, limit)
    writer = MDSWriter(out=str(dataset_dir), columns=MDS_COLUMNS, compression=COMPRESSION, hashes=HASHES,
                       size_limit=shard_size_limit)

    def write(outcome: RowOutcome) -> None:
        writer.write({"input_ids": outcome.input_ids, "token_roles": outcome.token_roles, "source": spec.name})
        stats.add_written(outcome)

    kept: list[RowOutcome] = []  # only with a limit: drawn once every valid row is known
    try:
        with tqdm(total=reader.total, desc=spec.name, unit="row", file=sys.stderr,
                  disable=None if progress is None else not progress) as bar:
            chunks = chunked(reader, rows_per_chunk)
            for outcomes in chunk_encoder.map(spec.kind, chunks, path=spec.path, unit=reader.unit):
                for outcome in outcomes:
                    stats.rows_read += 1
                    if outcome.error is not None and on_error == "raise":
                        raise outcome.error
                    if outcome.skip_reason is not None:
                        stats.rows_skipped[outcome.skip_reason] += 1
                    elif limit is None:
                        write(outcome)
                    else:
                        kept.append(outcome)
                bar.update(len(outcomes))
        if limit is not None:
            chosen = np.zeros(len(kept), dtype=bool)
            chosen[choose_rows(len(kept), limit, seed, spec.name)] = True
            for outcome, is_chosen in zip(kept, chosen):
                if is_chosen:
                    write(outcome)
                else:
                    stats.rows_skipped[OVER_LIMIT] += 1
        if stats.rows_written == 0:
            raise BuildError(f"source {spec.name!r} ({spec.path}): no rows left to write "
                             f"(read {stats.rows_read}, skipped {dict(stats.rows_skipped)})")
    except BaseException:
        cancel_quietly(writer)
        raise
    writer.finish()
    return stats


def cancel_quietly(writer: Any) -> None:
    """Cancel an MDS writer's pending jobs without a traceback on stderr.

    Each cancelled future runs streaming's done-callback, which raises ``CancelledError``; that is
    expected when a build stops, but ``concurrent.futures`` would log it as a traceback.
    """
    futures_log = logging.getLogger("concurrent.futures")
    was_disabled, futures_log.disabled = futures_log.disabled, True
    try:
        writer.cancel_future_jobs()
    finally:
        futures_log.disabled = was_disabled


def _manifest(tokenizer: PreTrainedTokenizerBase, tokenizer_name: str, max_seq_len: int,
              stats: dict[str, SourceStats], **options: Any) -> dict[str, Any]:
    local_dir = os.path.abspath(tokenizer_name) if os.path.isdir(tokenizer_name) else None
    sources = {name: source.to_json() for name, source in stats.items()}
    totals = {key: sum(source[key] for source in sources.values())
              for key in ("rows_read", "rows_written", "rows_truncated")}
    totals["tokens"] = dict(sum((Counter(source["tokens"]) for source in sources.values()), Counter()))
    options["limits"] = dict(sorted(options["limits"].items()))
    options["mix"] = {name: weight.as_yaml() for name, weight in sorted(options["mix"].items())}
    return {
        "format_version": MANIFEST_VERSION,
        "tokenizer": {
            "name": tokenizer_name, "local_dir": local_dir, "vocab_size": len(tokenizer),
            "vocab_sha256": vocabulary_hash(tokenizer), "eos_token": tokenizer.eos_token,
            "eos_token_id": tokenizer.eos_token_id,
        },
        "max_seq_len": max_seq_len,
        "columns": MDS_COLUMNS,
        "options": {**options, "compression": COMPRESSION, "hashes": HASHES},
        "sources": sources,
        "totals": totals,
    }


def streams_yaml(target: OutputTarget, names: Sequence[str], mix: Mapping[str, StreamWeight]) -> str:
    """The ``streams:`` block for a recipe's ``train_loader:`` (StreamingDataset semantics)."""
    import yaml

    streams = {name: {**target.stream_paths(name), **mix.get(name, StreamWeight()).as_yaml()}
               for name in names}
    header = ("# Written by `remask-data build`; counts are in manifest.json.\n"
              "# Paste under a recipe's train_loader: (mixing: StreamingDataset's repeat/choose/proportion).\n")
    return header + yaml.safe_dump({"streams": streams}, sort_keys=False, default_flow_style=False)


def _move_into_place(staging: Path, final: Path, overwrite: bool) -> None:
    previous = None
    if final.exists():
        if any(final.iterdir()):
            if not overwrite:
                raise FileExistsError(f"--out {final} is not empty; pass --overwrite to replace it")
            previous = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
            final.rename(previous)
        else:
            final.rmdir()
    staging.rename(final)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def _uploader(local: Path, remote: str):
    from streaming.base.storage.upload import CloudUploader

    # exist_ok: the local folder is full on purpose; silence streaming's warning that says so.
    upload_logger = logging.getLogger("streaming.base.storage.upload")
    level = upload_logger.level
    upload_logger.setLevel(logging.ERROR)
    try:
        return CloudUploader.get((str(local), remote), keep_local=True, exist_ok=True)
    finally:
        upload_logger.setLevel(level)


def _upload(local: Path, remote: str, names: Sequence[str]) -> None:
    """Upload shards, then each index.json, then streams.yaml, and manifest.json last."""
    for name in names:
        uploader = _uploader(local / name, _join_remote(remote, name))
        index = json.loads((local / name / "index.json").read_text())
        for shard in index["shards"]:
            uploader.upload_file((shard["zip_data"] or shard["raw_data"])["basename"])
        uploader.upload_file("index.json")
    uploader = _uploader(local, remote)
    uploader.upload_file(STREAMS_NAME)
    uploader.upload_file(MANIFEST_NAME)
