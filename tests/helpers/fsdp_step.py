"""One ReMask step on an FSDP-wrapped model over gloo (CPU), compared with the unwrapped model.

Composer's FSDP needs CUDA, so this wraps ``ComposerModel.model`` the way Composer does (decoder
layers as child units, lm_head in the root) with torch's FSDP on the CPU and drives ReMask's events
in Composer's order. Run:
``PYTHONPATH=. composer -n 2 tests/helpers/fsdp_step.py OUT USE_ORIG_PARAMS [LAYOUT [SHARDING]]``
(``LAYOUT``: ``ReMask(forward_layout=...)``, default ``auto``; ``SHARDING``: ``fsdp1`` (FULL_SHARD,
the default), ``fsdp2`` (``fully_shard``, what Composer runs with ``FSDP_VERSION=2``) or
``fsdp2_bf16`` (``fully_shard`` with bf16 parameters in forward and backward, fp32 gradient reduction:
it casts the model's floating inputs, the shared-prefix attention mask among them)).
Each rank writes ``OUT.rank{r}`` with the largest weight difference after one SGD step and the noise
floor of that comparison: the float32 rounding of the unwrapped step (against it in float64), or
for ``fsdp2_bf16`` its bf16 rounding (the unwrapped step with bf16 parameters against it in float32).
That floor also holds the bf16 rounding of the SGD update, which FSDP2 (float32 master weights) does
not have, so the bf16 case shows agreement within the step's bf16 rounding, not exactness; float32
is where exactness is checked.
"""

from __future__ import annotations

import functools
import sys
import types
from pathlib import Path

import torch
import torch.distributed as tdist
from composer.core import Event, Precision, Timestamp
from composer.devices import DeviceCPU
from torch.distributed.fsdp import FullStateDictConfig, ShardingStrategy, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy
from transformers import StableLmForCausalLM
from transformers.models.stablelm.modeling_stablelm import StableLmDecoderLayer

from composer_remask import ReMask
from composer_remask.data.tokenizer import train_tiny_tokenizer
from composer_remask.train.model import ComposerCausalLM
from tests.helpers.synthetic import CoTDataset, collate
from tests.helpers.tiny_model import TINY_TEXT, tiny_stablelm_config
from tests.helpers.tolerances import float64_floor


def gloo_average_factor() -> float:
    """What gloo's reduce-scatter with ``ReduceOp.AVG`` multiplies the mean by: 1.0 where it averages, the
    world size where it sums (pytorch/pytorch#162338, torch 2.7), as FSDP2 then does with the gradients."""
    world = tdist.get_world_size()
    out = torch.zeros(1)
    tdist.reduce_scatter_tensor(out, torch.ones(world), op=tdist.ReduceOp.AVG)
    return float(out)


def _fully_shard(model: torch.nn.Module, bf16: bool) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cpu", (tdist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def one_step(wrap: bool, use_orig_params: bool, dtype: torch.dtype = torch.float32, forward_layout: str = "auto",
             sharding: str = "fsdp1", lr: float = 0.5):
    tokenizer = train_tiny_tokenizer(TINY_TEXT, 400)
    torch.manual_seed(0)
    model = ComposerCausalLM(StableLmForCausalLM(tiny_stablelm_config(len(tokenizer))), tokenizer,
                             train_metrics=False).to(dtype)
    algo = ReMask(mask_prob=0.4, weight=0.5, seed=5, forward_layout=forward_layout)
    logger = types.SimpleNamespace(log_metrics=lambda *a, **k: None)
    state = types.SimpleNamespace(
        model=model, rank_zero_seed=5, batch=collate([CoTDataset(tokenizer, 4)[i] for i in range(4)]),
        timestamp=Timestamp(), outputs=None, train_metrics=None, precision=Precision.FP32, precision_config=None,
        device=DeviceCPU(), loss=None, max_duration=None, get_elapsed_duration=lambda: None, algorithms=[algo])
    algo.apply(Event.INIT, state, logger)
    if wrap and sharding == "fsdp1":
        policy = functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda m: isinstance(m, StableLmDecoderLayer))
        model.model = FSDP(model.model, auto_wrap_policy=policy, use_orig_params=use_orig_params,
                           sharding_strategy=ShardingStrategy.FULL_SHARD, device_id=torch.device("cpu"))
    elif wrap:
        _fully_shard(model.model, bf16=sharding == "fsdp2_bf16")
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for event in (Event.FIT_START, Event.BATCH_START, Event.BEFORE_TRAIN_BATCH, Event.BEFORE_FORWARD):
        algo.apply(event, state, logger)
    state.outputs = model(state.batch)
    algo.apply(Event.AFTER_FORWARD, state, logger)
    state.loss = model.loss(state.outputs, state.batch)
    algo.apply(Event.AFTER_LOSS, state, logger)
    assert float(state.loss["total"]) > 1.0 and "divergence" in state.loss  # a real ReMask loss ran
    state.loss["total"].backward()
    algo.apply(Event.AFTER_TRAIN_BATCH, state, logger)
    optimizer.step()
    if wrap and sharding == "fsdp1":
        with FSDP.state_dict_type(model.model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False)):
            return {k: v.clone() for k, v in model.model.state_dict().items()}
    if wrap:  # fully_shard: DTensor shards, gathered whole
        return {k: v.full_tensor().detach().clone() for k, v in model.model.state_dict().items()}
    return model.model.state_dict()


def main(out: str, use_orig_params: bool, forward_layout: str = "auto", sharding: str = "fsdp1") -> None:
    tdist.init_process_group("gloo")
    world = tdist.get_world_size()
    # Every rank holds the same batch, so averaged gradients are each rank's own: the wrapped step equals
    # the unwrapped one, at the learning rate times what the reduction multiplies the mean by.
    lr = 0.5 * (gloo_average_factor() if sharding != "fsdp1" else 1.0)
    step = functools.partial(one_step, use_orig_params=use_orig_params, forward_layout=forward_layout,
                             sharding=sharding)
    reference = step(wrap=False, lr=lr)
    for value in reference.values():
        if value.is_floating_point():
            tdist.all_reduce(value)
            value /= world
    wrapped = step(wrap=True)
    diff = max((wrapped[k].float() - reference[k]).abs().max().item() for k in reference)
    if sharding == "fsdp2_bf16":  # bf16 rounding of this step: the unwrapped step with bf16 parameters
        low = step(wrap=False, lr=lr, dtype=torch.bfloat16)
        floor = max((low[k].float() - reference[k]).abs().max().item() for k in reference)
    else:  # the unwrapped step in float64: how far float32 rounding alone moves this step
        floor = float64_floor(reference, step(wrap=False, lr=lr, dtype=torch.float64))
    Path(f"{out}.rank{tdist.get_rank()}").write_text(f"{diff} {floor}\n")
    tdist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "1", *sys.argv[3:5])
