"""Dataset and dataloader: a recipe's ``train_loader``/``eval_loader`` section -> Composer DataSpec.

The section (YAML, plain dict or omegaconf)::

    streams:                      # or a single `local:`/`remote:` at the top level
      tinycot: {local: corpus/tinycot, remote: null, repeat: 1}
      oasst2:  {local: corpus/oasst2, choose: 1000}
    max_seq_len: 256              # rows are capped to it; pad_to: longest | max_seq_len
    pad_to: longest
    shuffle: true
    shuffle_seed: 17
    num_workers: 0
    drop_last: true
    # StreamingDataset: num_canonical_nodes, batching_method, epoch_size, predownload, cache_limit,
    #   shuffle_algo, shuffle_block_size, sampling_method, sampling_granularity, partition_algo
    # DataLoader: pin_memory, persistent_workers, prefetch_factor, timeout

Mixing is StreamingDataset's (``proportion`` | ``repeat`` | ``choose`` per stream; finite,
non-negative). A stream with a ``remote`` and no ``local`` caches under
``$TMPDIR/remask-streams/<hash of remote>`` (stable across runs and ranks; like any streaming cache
it is not refreshed when the remote changes). A ``local`` folder this process cannot write to,
whose shards are not all decompressed yet, is read as a remote into such a cache (keyed by its
``index.json`` too, so a rebuilt corpus gets a fresh cache): StreamingDataset decompresses shards
next to ``index.json``.

Before training, every shard file already on disk (decompressed ``.mds`` or compressed ``.zstd``)
is checked against the size and hash that ``index.json`` records for it, so a corrupt shard stops
the run naming the file: StreamingDataset's ``validate_hash`` checks only what it downloads or
decompresses itself, never a decompressed shard it finds in place. This reads the corpus once per
loader (xxh64, fast next to training).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import torch

from composer_remask.batch import batch_loss_tokens, tokenizer_pad_id
from composer_remask.checks import finite_number
from composer_remask.data.collator import RemaskCollator
from composer_remask.data.shards import read_index, verify_shards_on_disk

if TYPE_CHECKING:
    from composer.core import DataSpec
    from streaming import StreamingDataset
    from transformers import PreTrainedTokenizerBase

LOADER_DEFAULTS: dict[str, Any] = {
    "streams": None, "local": None, "remote": None, "split": None,
    "max_seq_len": None, "pad_to": "longest",
    "shuffle": True, "shuffle_seed": 17, "num_workers": 0, "drop_last": True,
    "num_canonical_nodes": None, "batching_method": "random", "epoch_size": None, "predownload": None,
    "cache_limit": None, "pin_memory": False, "persistent_workers": False, "prefetch_factor": None,
    "timeout": 0,
}
# Passed to StreamingDataset only when set, so streaming's own defaults apply otherwise.
OPTIONAL_DATASET_KEYS = ("shuffle_algo", "shuffle_block_size", "sampling_method", "sampling_granularity",
                         "partition_algo")
STREAM_KEYS = ("local", "remote", "split", "proportion", "repeat", "choose", "download_retry",
               "download_timeout", "validate_hash", "keep_zip")


def _plain(config: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return config
    if isinstance(config, (DictConfig, ListConfig)):
        return OmegaConf.to_container(config, resolve=True)
    return config


def _loader_config(loader_cfg: Mapping[str, Any]) -> dict[str, Any]:
    config = dict(_plain(loader_cfg))
    known = set(LOADER_DEFAULTS) | set(OPTIONAL_DATASET_KEYS)
    for key in config:
        if key not in known:
            raise ValueError(f"unknown data loader key {key!r}; known keys: {', '.join(sorted(known))}")
    return {**LOADER_DEFAULTS, **config}


def _default_local(remote: str, split: str | None) -> str:
    digest = hashlib.blake2s(f"{remote}\0{split or ''}".encode(), digest_size=8).hexdigest()
    return os.path.join(tempfile.gettempdir(), "remask-streams", digest)


def _all_decompressed(dataset_dir: str) -> bool:
    return all(os.path.isfile(os.path.join(dataset_dir, shard["raw_data"]["basename"]))
               for shard in read_index(dataset_dir)["shards"])


def _read_only_cache(local_dir: str, split: str | None) -> str:
    with open(os.path.join(local_dir, "index.json"), "rb") as f:
        index_digest = hashlib.blake2s(f.read(), digest_size=8).hexdigest()
    return _default_local(f"{os.path.realpath(local_dir)}\0{index_digest}", split)


def _resolve_stream_paths(stream: dict[str, Any]) -> None:
    """Fill in ``local`` for a remote-only stream, and read a read-only local folder through a cache."""
    split = stream.get("split")
    if stream.get("local") is None:
        stream["local"] = _default_local(stream["remote"], split)
        return
    local_dir = os.path.join(stream["local"], split or "")
    if (stream.get("remote") is None and os.path.isfile(os.path.join(local_dir, "index.json"))
            and not os.access(local_dir, os.W_OK) and not _all_decompressed(local_dir)):
        stream["remote"], stream["local"] = stream["local"], _read_only_cache(local_dir, split)


def _verify_stream(stream: Mapping[str, Any]) -> None:
    split = stream.get("split") or ""
    for root in (stream.get("remote"), stream.get("local")):
        if root is None or urlparse(str(root)).scheme:
            continue
        dataset_dir = os.path.join(root, split)
        if os.path.isfile(os.path.join(dataset_dir, "index.json")):
            verify_shards_on_disk(dataset_dir)


def _stream_configs(config: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    streams = config["streams"]
    if streams is not None and (config["local"] is not None or config["remote"] is not None):
        raise ValueError("give either `streams:` or a top-level `local:`/`remote:`, not both")
    if streams is None:
        if config["local"] is None and config["remote"] is None:
            raise ValueError("the data loader needs `streams:` or a top-level `local:`/`remote:`")
        return [("stream", {"local": config["local"], "remote": config["remote"], "split": config["split"]})]
    if isinstance(streams, Mapping):
        named = [(str(name), dict(stream or {})) for name, stream in streams.items()]
    elif isinstance(streams, list):
        named = [(str(index), dict(stream)) for index, stream in enumerate(streams)]
    else:
        raise ValueError(f"`streams:` must be a mapping of name -> stream, got {type(streams).__name__}")
    if not named:
        raise ValueError("`streams:` is empty")
    for name, stream in named:
        for key in stream:
            if key not in STREAM_KEYS:
                raise ValueError(f"unknown key {key!r} in stream {name!r}; known keys: {', '.join(STREAM_KEYS)}")
        if stream.get("local") is None and stream.get("remote") is None:
            raise ValueError(f"stream {name!r} needs `local:` and/or `remote:`")
        for key in ("proportion", "repeat", "choose", "download_timeout"):
            if stream.get(key) is not None:
                finite_number(stream[key], f"stream {name!r}, {key}", low=0.0)
        stream.setdefault("split", config["split"])
    return named


def build_streaming_dataset(loader_cfg: Mapping[str, Any], device_batch_size: int) -> StreamingDataset:
    """The StreamingDataset a loader section describes (rows: input_ids, token_roles, source)."""
    from streaming import Stream, StreamingDataset

    config = _loader_config(loader_cfg)
    streams = []
    for _, stream in _stream_configs(config):
        _resolve_stream_paths(stream)
        _verify_stream(stream)
        streams.append(Stream(**{key: value for key, value in stream.items() if value is not None}))
    optional = {key: config[key] for key in OPTIONAL_DATASET_KEYS if config.get(key) is not None}
    return StreamingDataset(
        streams=streams, batch_size=device_batch_size, shuffle=config["shuffle"],
        shuffle_seed=config["shuffle_seed"], num_canonical_nodes=config["num_canonical_nodes"],
        batching_method=config["batching_method"], epoch_size=config["epoch_size"],
        predownload=config["predownload"], cache_limit=config["cache_limit"], **optional)


def get_num_samples_in_batch(batch: Mapping[str, torch.Tensor]) -> int:
    return int(batch["input_ids"].shape[0])


def get_num_tokens_in_batch(batch: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Attended tokens, and loss-generating ones counted exactly as the loss counts them."""
    return {"total": int(batch["attention_mask"].sum().item()), "loss_generating": batch_loss_tokens(batch)}


def build_dataloader(loader_cfg: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase,
                     device_batch_size: int) -> DataSpec:
    """A Composer DataSpec over the streams of ``loader_cfg``, collated by ``RemaskCollator``.

    Unknown keys raise ``ValueError`` naming the key. ``get_num_tokens_in_batch`` gives
    ``{'total', 'loss_generating'}`` so ``accumulate_train_batch_on_tokens`` weighs microbatches
    as the loss does.
    """
    from composer.core import DataSpec
    from torch.utils.data import DataLoader

    config = _loader_config(loader_cfg)
    finite_number(config["timeout"], "timeout", low=0.0)
    pad_id = tokenizer_pad_id(tokenizer)
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token to pad with")
    collator = RemaskCollator(pad_id, max_seq_len=config["max_seq_len"], pad_to=config["pad_to"])
    dataset = build_streaming_dataset(config, device_batch_size)
    dataloader = DataLoader(
        dataset, batch_size=device_batch_size, collate_fn=collator, num_workers=config["num_workers"],
        drop_last=config["drop_last"], pin_memory=config["pin_memory"],
        persistent_workers=config["persistent_workers"], prefetch_factor=config["prefetch_factor"],
        timeout=config["timeout"])
    return DataSpec(dataloader, get_num_samples_in_batch=get_num_samples_in_batch,
                    get_num_tokens_in_batch=get_num_tokens_in_batch)
