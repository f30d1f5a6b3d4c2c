"""Throughput of `remask-data build` beside the tokenizer's own batch encoding, on the same text.

    .venv/bin/python bench/data_bench.py [--rows 20000] [--tokenizer assets/tiny-tokenizer] [--workers 1,2]

Generates a corpus (TinyCoT-, oasst2- and reddit-shaped rows in equal parts, from the fixture
templates), then times, in one run:

- ``tokenizer(texts)``: the Hugging Face fast tokenizer's batch call on the fully rendered examples
  (the ceiling for tokenization alone), and the Rust backend's ``encode_batch_fast``;
- ``build_corpus``: reading JSONL, validating, tokenizing with roles, fitting, writing zstd MDS
  shards and the manifest, for each ``--workers`` count.

Prints a table and, last, one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from composer_remask.data.formats import example_segments, render_text
from composer_remask.data.sources import SourceSpec, open_records, parse_record
from composer_remask.data.tokenizer import load_tokenizer
from composer_remask.data.writer import build_corpus
from composer_remask.tools.fixtures import (
    oasst2_rows,
    reddit_rows,
    tinycot_rows,
    write_jsonl,
)

REPO = Path(__file__).resolve().parents[1]


def rendered_texts(specs: list[SourceSpec], eos_token: str) -> list[str]:
    """Every example exactly as the writer formats it, as one string each."""
    texts = []
    for spec in specs:
        reader = open_records(spec.path)
        for record in reader:
            example, _ = parse_record(spec.kind, record, path=spec.path, unit=reader.unit)
            texts.append(render_text(example_segments(example), eos_token))
    return texts


def best_of(repeats: int, run) -> float:
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        timings.append(time.perf_counter() - start)
    return min(timings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20000, help="rows in total, split over three sources")
    parser.add_argument("--tokenizer", default=str(REPO / "assets" / "tiny-tokenizer"))
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts for the writer")
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="best of N for each measurement")
    args = parser.parse_args(argv)

    tokenizer = load_tokenizer(args.tokenizer)
    work = Path(tempfile.mkdtemp(prefix="remask-data-bench-"))
    try:
        per_source = args.rows // 3
        specs = [SourceSpec("tinycot", "tinycot", str(write_jsonl(work / "tinycot.jsonl", tinycot_rows(per_source, 11)))),
                 SourceSpec("oasst2", "oasst2", str(write_jsonl(work / "oasst2.jsonl", oasst2_rows(per_source, 11)))),
                 SourceSpec("reddit", "reddit", str(write_jsonl(work / "reddit.jsonl", reddit_rows(per_source, 11))))]
        texts = rendered_texts(specs, tokenizer.eos_token)
        rows = len(texts)

        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        tokens = sum(map(len, encoded))
        hf_seconds = best_of(args.repeats, lambda: tokenizer(texts, add_special_tokens=False))
        backend = tokenizer.backend_tokenizer
        rust_seconds = best_of(args.repeats, lambda: backend.encode_batch_fast(texts, add_special_tokens=False))

        results = [("tokenizer(texts) [HF batch]", hf_seconds, tokens),
                   ("backend.encode_batch_fast [Rust]", rust_seconds, tokens)]
        writer = {}
        for workers in (int(w) for w in args.workers.split(",")):
            manifest = {}

            def build(workers=workers, manifest=manifest):
                out = work / f"out-{workers}"
                shutil.rmtree(out, ignore_errors=True)
                manifest.update(build_corpus(specs, tokenizer, str(out), max_seq_len=args.max_seq_len,
                                             workers=workers, progress=False))

            seconds = best_of(args.repeats, build)
            written = manifest["totals"]["tokens"]["total"]
            results.append((f"build_corpus workers={workers}", seconds, written))
            writer[str(workers)] = {"seconds": round(seconds, 3), "tokens": written,
                                    "tokens_per_s": round(written / seconds),
                                    "rows_written": manifest["totals"]["rows_written"]}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"{rows} rows, {tokens} tokens (max_seq_len {args.max_seq_len}), tokenizer {args.tokenizer}, "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    print(f"{'what':<36} {'seconds':>8} {'tokens/s':>12} {'rows/s':>10}")
    for name, seconds, count in results:
        print(f"{name:<36} {seconds:>8.3f} {count / seconds:>12,.0f} {rows / seconds:>10,.0f}")
    print(json.dumps({
        "rows": rows, "tokens": tokens, "tokenizer": args.tokenizer, "cpus": os.cpu_count(),
        "hf_batch_tokens_per_s": round(tokens / hf_seconds), "rust_batch_tokens_per_s": round(tokens / rust_seconds),
        "writer": writer,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
