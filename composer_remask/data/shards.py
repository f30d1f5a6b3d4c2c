"""MDS shards on disk, checked against ``index.json``: verify them, or read their samples without streaming.

Shared by the training loader (``data/dataset.py``, which checks every shard already on disk
before StreamingDataset reads it) and the build-time inspection (``data/inspection.py``), which
must not import the training loader.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["ShardIntegrityError", "read_index", "read_mds_samples", "shard_data", "verify_shards_on_disk"]

# Cheapest first: the hash used to check a shard file that index.json gives several hashes for.
HASH_PREFERENCE = ("xxh3_64", "xxh64", "xxh128", "xxh32", "md5", "sha1", "sha256")


class ShardIntegrityError(ValueError):
    """A shard file on disk differs from what ``index.json`` records for it."""


def _check_shard_file(path: str, info: Mapping[str, Any], data: bytes, remedy: str = "rebuild the corpus") -> None:
    from streaming.base.hashing import get_hash

    if "bytes" in info and len(data) != info["bytes"]:
        raise ShardIntegrityError(f"{path}: {len(data)} bytes, but index.json records {info['bytes']}: the shard is "
                                  f"truncated or corrupt; {remedy}")
    hashes = info.get("hashes") or {}
    algorithm = next((name for name in HASH_PREFERENCE if name in hashes), min(hashes, default=None))
    if algorithm is not None and get_hash(algorithm, data) != hashes[algorithm]:
        raise ShardIntegrityError(f"{path}: {algorithm} {get_hash(algorithm, data)} differs from "
                                  f"{hashes[algorithm]} recorded in index.json: the shard is corrupt; {remedy}")


def _remedy(shard_info: Mapping[str, Any], info: Mapping[str, Any]) -> str:
    zipped = shard_info["zip_data"]
    if info is shard_info["raw_data"] and zipped is not None:
        return (f"delete it to have it decompressed again from {zipped['basename']} (which is checked), "
                "or rebuild the corpus")
    return "rebuild the corpus (or copy it again)"


def read_index(dataset_dir: str) -> dict[str, Any]:
    with open(os.path.join(dataset_dir, "index.json")) as f:
        return json.load(f)


def shard_data(dataset_dir: str, shard_info: Mapping[str, Any]) -> bytes:
    """The decompressed bytes of one MDS shard, as StreamingDataset would read them, checked.

    The decompressed file when present (what training reads), else the compressed one,
    decompressed in memory. Raises ``ShardIntegrityError`` naming the file when a size or hash
    differs from ``index.json``.
    """
    from streaming.base.compression import decompress

    raw, zipped = shard_info["raw_data"], shard_info["zip_data"]
    raw_path = os.path.join(dataset_dir, raw["basename"])
    if zipped is None or os.path.isfile(raw_path):
        with open(raw_path, "rb") as f:
            data = f.read()
        _check_shard_file(raw_path, raw, data, _remedy(shard_info, raw))
        return data
    zip_path = os.path.join(dataset_dir, zipped["basename"])
    with open(zip_path, "rb") as f:
        compressed = f.read()
    _check_shard_file(zip_path, zipped, compressed, _remedy(shard_info, zipped))
    data = decompress(shard_info["compression"], compressed)
    _check_shard_file(f"{zip_path} (decompressed)", raw, data)
    return data


def verify_shards_on_disk(dataset_dir: str) -> None:
    """Check every shard file present under ``dataset_dir`` against its ``index.json`` entry.

    A decompressed shard is what training reads when present; a compressed one is checked
    too, since StreamingDataset decompresses it without a check unless ``validate_hash`` is set.
    Missing files are left to StreamingDataset (it downloads or decompresses them).
    """
    for shard_info in read_index(dataset_dir)["shards"]:
        for info in (shard_info["raw_data"], shard_info["zip_data"]):
            if info is None:
                continue
            path = os.path.join(dataset_dir, info["basename"])
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except FileNotFoundError:  # not there (yet, or evicted by the cache limit meanwhile)
                continue
            _check_shard_file(path, info, data, _remedy(shard_info, info))
            break  # the raw file, when present, is the one read; its zip is not used



def read_mds_samples(local_dir: str, limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Samples of one local MDS dataset, in order, from the bytes training reads, checked.

    For inspection and checks: no shared memory, nothing written next to the shards (unlike
    StreamingDataset, which decompresses local shards to disk). Each shard is read as
    ``shard_data`` reads it; a corrupt one raises ``ShardIntegrityError`` naming the file.
    """
    import numpy as np
    from streaming.base.format.mds.reader import MDSReader

    produced = 0
    for shard_info in read_index(local_dir)["shards"]:
        reader = MDSReader.from_json(local_dir, None, shard_info)
        data = shard_data(local_dir, shard_info)
        num_samples = int(np.frombuffer(data[:4], np.uint32)[0])
        offsets = np.frombuffer(data[4:4 * (num_samples + 2)], np.uint32)
        for i in range(num_samples):
            if limit is not None and produced >= limit:
                return
            yield reader.decode_sample(data[offsets[i]:offsets[i + 1]])
            produced += 1
