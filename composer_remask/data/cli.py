"""``remask-data``: build the MDS corpus (``build``) and look at it (``inspect``).

    remask-data build --source tinycot=PATH --source oasst2=PATH --source reddit=PATH \\
        --source mine=jsonl:PATH --tokenizer NAME_OR_DIR --max-seq-len 256 --out DIR \\
        [--limit oasst2=1000] [--mix oasst2=choose:500] [--seed 0] [--on-error raise|skip] \\
        [--overwrite] [--workers N]
    remask-data inspect DIR [--n 3] [--source NAME] [--tokenizer NAME_OR_DIR]

Every error prints ``remask-data: error: ...`` (or argparse's ``remask-data build: error: ...``
for a malformed option) and exits with status 2. Ctrl-C, SIGTERM or SIGHUP during a build
removes the partial output, ends the worker processes and exits with 128 + the signal number.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from composer_remask.data.writer import StreamWeight

ERROR_STATUS = 2  # argparse's, for every error


def _key_value(option: str, text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"{option} {text!r}: expected NAME=VALUE")
    return name, value


def _limit_arg(text: str) -> tuple[str, int]:
    name, value = _key_value("--limit", text)
    try:
        limit = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--limit {text!r}: N must be an integer") from None
    if limit < 0:
        raise argparse.ArgumentTypeError(f"--limit {text!r}: N must be >= 0")
    return name, limit


def _mix_arg(text: str) -> tuple[str, StreamWeight]:
    from composer_remask.data.writer import parse_stream_weight

    name, value = _key_value("--mix", text)
    try:
        return name, parse_stream_weight(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--mix {text!r}: {error}") from None


def _size_arg(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="remask-data", description="Build the ReMask MDS corpus and look at it.")
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", help="write one MDS dataset per source, a manifest and streams.yaml")
    build.add_argument("--source", action="append", required=True, metavar="NAME=[KIND:]PATH",
                       help="a source; KIND is one of tinycot, oasst2, reddit, jsonl, jsonl-messages, "
                            "jsonl-prompt-response, jsonl-cot (default: NAME). PATH: .jsonl/.json/.parquet "
                            "file, or a hub dataset name[@split]")
    build.add_argument("--tokenizer", required=True, help="hub name or folder of a fast tokenizer")
    build.add_argument("--max-seq-len", type=int, default=256)
    build.add_argument("--out", required=True,
                       help="folder; or LOCAL,REMOTE; or an object-store URL (s3://..., gs://...)")
    build.add_argument("--limit", action="append", type=_limit_arg, default=[], metavar="NAME=N",
                       help="keep N rows of a source, drawn with --seed among its valid rows")
    build.add_argument("--mix", action="append", type=_mix_arg, default=[], metavar="NAME=WEIGHT",
                       help="weight in streams.yaml: repeat:X, choose:N or proportion:P (default repeat:1)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                       help="bad rows: stop with an error naming file, line and field, or skip and count them")
    build.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    build.add_argument("--workers", type=int, default=1, help="tokenizer worker processes (output is identical)")
    build.add_argument("--rows-per-chunk", type=int, default=1000, help="rows tokenized per batch")
    build.add_argument("--shard-size-limit", type=_size_arg, default=1 << 26, help="bytes per shard, e.g. 64mb")
    build.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")

    inspect = commands.add_parser("inspect", help="decode samples and show each token span with its role")
    inspect.add_argument("dir", help="a folder written by `remask-data build`")
    inspect.add_argument("--n", type=int, default=3, help="samples per source")
    inspect.add_argument("--source", help="only this source")
    inspect.add_argument("--tokenizer", help="override the tokenizer recorded in the manifest")
    return parser


def _summary(manifest: dict, out: str) -> str:
    rows = [("source", "read", "written", "skipped", "truncated", "tokens")]
    for name, stats in manifest["sources"].items():
        skipped = sum(stats["rows_skipped"].values())
        rows.append((name, str(stats["rows_read"]), str(stats["rows_written"]), str(skipped),
                     str(stats["rows_truncated"]), str(stats["tokens"]["total"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    table = "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                      for row in rows)
    return f"{table}\nwrote {out} (manifest.json, streams.yaml)"


def _run_build(args: argparse.Namespace) -> int:
    from composer_remask.data.sources import parse_source_arg
    from composer_remask.data.writer import build_corpus

    sources = [parse_source_arg(text) for text in args.source]
    manifest = build_corpus(
        sources, args.tokenizer, args.out, max_seq_len=args.max_seq_len, limits=dict(args.limit), mix=dict(args.mix),
        seed=args.seed, on_error=args.on_error, overwrite=args.overwrite, workers=args.workers,
        progress=False if args.no_progress else None, rows_per_chunk=args.rows_per_chunk,
        shard_size_limit=args.shard_size_limit)
    print(_summary(manifest, args.out))
    return 0


def _run_inspect(args: argparse.Namespace) -> int:
    from composer_remask.data.inspection import inspect_corpus

    sys.stdout.write(inspect_corpus(args.dir, n=args.n, source=args.source, tokenizer=args.tokenizer))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``remask-data`` console script; returns the exit status (see module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run_build(args) if args.command == "build" else _run_inspect(args)
    except KeyboardInterrupt as interrupt:  # Ctrl-C, or BuildInterrupted for SIGTERM/SIGHUP
        from composer_remask.data.pipeline import TERMINATION_SIGNALS

        for repeat in (signal.SIGINT, *TERMINATION_SIGNALS):  # exiting: a repeated Ctrl-C adds no traceback
            signal.signal(repeat, signal.SIG_IGN)
        signum = getattr(interrupt, "signum", signal.SIGINT)
        cleaned = "; the partial output was removed" if args.command == "build" else ""
        print(f"{parser.prog}: error: interrupted by {signal.Signals(signum).name}{cleaned}", file=sys.stderr)
        return 128 + signum
    except (ValueError, OSError, RuntimeError, argparse.ArgumentTypeError) as error:
        # DataError and BuildError (ValueErrors) name file, line and field; the others the option or path.
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return ERROR_STATUS


if __name__ == "__main__":
    sys.exit(main())
