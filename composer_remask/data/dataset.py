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

Mixing is StreamingDataset's (``proportion`` | ``repeat`` | ``choose`` per stream). A stream with a
``remote`` and no ``local`` caches under ``$TMPDIR/remask-streams/<hash of remote>`` (stable across
runs and ranks; like any streaming cache it is not refreshed when the remote changes).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

from composer_remask.batch import batch_loss_tokens
from composer_remask.data.collator import RemaskCollator

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
        stream.setdefault("split", config["split"])
    return named


def build_streaming_dataset(loader_cfg: Mapping[str, Any], device_batch_size: int) -> StreamingDataset:
    """The StreamingDataset a loader section describes (rows: input_ids, token_roles, source)."""
    from streaming import Stream, StreamingDataset

    config = _loader_config(loader_cfg)
    streams = []
    for _, stream in _stream_configs(config):
        if stream.get("local") is None:
            stream["local"] = _default_local(stream["remote"], stream.get("split"))
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
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_token_id is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token to pad with")
    collator = RemaskCollator(pad_token_id, max_seq_len=config["max_seq_len"], pad_to=config["pad_to"])
    dataset = build_streaming_dataset(config, device_batch_size)
    dataloader = DataLoader(
        dataset, batch_size=device_batch_size, collate_fn=collator, num_workers=config["num_workers"],
        drop_last=config["drop_last"], pin_memory=config["pin_memory"],
        persistent_workers=config["persistent_workers"], prefetch_factor=config["prefetch_factor"],
        timeout=config["timeout"])
    return DataSpec(dataloader, get_num_samples_in_batch=get_num_samples_in_batch,
                    get_num_tokens_in_batch=get_num_tokens_in_batch)


def read_mds_samples(local_dir: str, limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Samples of one local MDS dataset, in order, decompressed in memory.

    For inspection and checks: no shared memory, nothing written next to the shards (unlike
    StreamingDataset, which decompresses local shards to disk).
    """
    import numpy as np
    from streaming.base.compression import decompress
    from streaming.base.format.mds.reader import MDSReader

    with open(os.path.join(local_dir, "index.json")) as f:
        index = json.load(f)
    produced = 0
    for shard_info in index["shards"]:
        reader = MDSReader.from_json(local_dir, None, shard_info)
        data_info = shard_info["zip_data"] or shard_info["raw_data"]
        with open(os.path.join(local_dir, data_info["basename"]), "rb") as f:
            data = f.read()
        if shard_info["zip_data"]:
            data = decompress(shard_info["compression"], data)
        num_samples = int(np.frombuffer(data[:4], np.uint32)[0])
        offsets = np.frombuffer(data[4:4 * (num_samples + 2)], np.uint32)
        for i in range(num_samples):
            if limit is not None and produced >= limit:
                return
            yield reader.decode_sample(data[offsets[i]:offsets[i + 1]])
            produced += 1
