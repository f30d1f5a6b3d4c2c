"""``init_device: mixed`` over gloo: rank 0 loads, the others build on meta, FSDP syncs and shards.

Composer's FSDP needs CUDA (it moves meta modules to ``cuda:N``), so this wraps the Hugging Face
module the way Composer's ``prepare_fsdp_module`` does (decoder layers as units, its
``_param_init_fn``: ``to_empty`` then the model's ``param_init_fn``, ``sync_module_states=True``)
on the CPU (FSDP's GPU-only check before the sync is lifted; gloo broadcasts CPU tensors). Run
``PYTHONPATH=. composer -n 2 tests/helpers/mixed_init.py OUT MODEL_DIR FULL_SHARD`` or
``PYTHONPATH=. composer -n 4 tests/helpers/mixed_init.py OUT MODEL_DIR HYBRID_SHARD``: 2 "nodes" of 2 ranks
(``LOCAL_RANK`` set to ``rank % 2``, so ranks 0 and 2 load and 1 and 3 build on meta) on a
(replicate, shard) = (2, 2) device mesh, as Composer builds from ``data_parallel_replicate_degree``.
(With a shard group of one rank FSDP quietly turns HYBRID_SHARD into NO_SHARD and skips the sync
across replicas, so the shard degree must be at least 2.)
Each rank writes ``OUT.rank{r}.json``: where its parameters were built, the largest difference
between its gathered weights and a full load, and the loss of one forward of both.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as tdist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullStateDictConfig, ShardingStrategy, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import CustomPolicy

from composer_remask.data.tokenizer import load_tokenizer
from composer_remask.train.model import hf_causal_lm
from tests.helpers.assets import TINY_TOKENIZER

RANKS_PER_NODE = 2


def allow_cpu_sync_module_states() -> None:
    """Lift FSDP's "sync_module_states needs GPU tensors" check (NCCL's need; gloo broadcasts CPU tensors).

    The broadcast that follows it (``_sync_params_and_buffers`` from rank 0 of each group) is the
    one that runs on GPUs.
    """
    from torch.distributed.fsdp import _init_utils

    _init_utils._check_module_states_for_sync_module_states = lambda module_states: None


def composer_param_init_fn(wrapped: torch.nn.Module):
    """Composer's ``_param_init_fn`` with ``cpu`` for ``cuda:N``: materialize one module, then init it."""

    def init(module: torch.nn.Module) -> None:
        if not (any(p.is_meta for p in module.parameters(recurse=False))
                or any(b.is_meta for b in module.buffers(recurse=False))):
            return
        module.to_empty(device="cpu", recurse=False)
        wrapped.param_init_fn(module)

    return init


def full_load(tokenizer, model_dir: str) -> torch.nn.Module:
    torch.manual_seed(0)  # the rows added for the tokenizer are drawn at random: same seed as rank 0's load
    return hf_causal_lm(tokenizer, "cpu", pretrained_model_name_or_path=model_dir).model


def main(out: str, model_dir: str, strategy: str) -> None:
    tdist.init_process_group("gloo")
    allow_cpu_sync_module_states()
    rank, world = tdist.get_rank(), tdist.get_world_size()
    if strategy == "HYBRID_SHARD":
        os.environ["LOCAL_RANK"] = str(rank % RANKS_PER_NODE)
    tokenizer = load_tokenizer(str(TINY_TOKENIZER))

    torch.manual_seed(0)
    composer_model = hf_causal_lm(tokenizer, "mixed", pretrained_model_name_or_path=model_dir)
    hf = composer_model.model
    built_on = sorted({p.device.type for p in hf.parameters()})

    kwargs = {}
    if strategy == "HYBRID_SHARD":
        kwargs["device_mesh"] = init_device_mesh("cpu", (world // RANKS_PER_NODE, RANKS_PER_NODE),
                                                 mesh_dim_names=("data_parallel_replicate", "data_parallel_shard"))
    wrapped = FSDP(hf, auto_wrap_policy=CustomPolicy(hf.fsdp_wrap_fn), param_init_fn=composer_param_init_fn(hf),
                   sync_module_states=True, sharding_strategy=ShardingStrategy[strategy], use_orig_params=True,
                   device_id=torch.device("cpu"), **kwargs)
    with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False)):
        gathered = {k: v.clone() for k, v in wrapped.state_dict().items()}

    reference = full_load(tokenizer, model_dir)
    expected = reference.state_dict()
    ids = torch.randint(5, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        loss_sharded = float(wrapped(input_ids=ids, labels=ids).loss)
        loss_full = float(reference(input_ids=ids, labels=ids).loss)
    report = {
        "rank": rank, "built_on": built_on, "keys_match": sorted(gathered) == sorted(expected),
        "max_abs_diff": max((gathered[k].float() - expected[k].float()).abs().max().item()
                            for k in expected if k in gathered),
        "loss_sharded": loss_sharded, "loss_full": loss_full,
        "differing": sorted(k for k in expected if k in gathered and not torch.equal(gathered[k], expected[k])),
        "embedding_rows": int(expected["model.embed_tokens.weight"].shape[0]),
    }
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(report))
    tdist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
