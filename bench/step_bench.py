"""Step time and memory of SFT, a naive ReMask and composer_remask.ReMask, side by side.

One model, one batch, one ``composer.Trainer``; the three methods take turns step by step (the
algorithm list is swapped between one-batch ``fit`` calls), so machine noise hits all of them
alike. Peak memory: on CUDA from the allocator, in the same run; on the CPU each method runs in a
child process with a fixed mmap threshold, so resident memory tracks live tensors.

    python bench/step_bench.py                       # CPU, StableLM-shaped, vocab 50304, seq 256
    python bench/step_bench.py --device cuda --model 3b --batch 16 [--fsdp]

The last line printed is one JSON object (ratios, medians, memory, device, shapes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from composer import Trainer  # noqa: E402
from composer.core import Algorithm, Callback, Event, State  # noqa: E402
from composer.loggers import Logger  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import StableLmConfig, StableLmForCausalLM  # noqa: E402
from transformers.modeling_outputs import CausalLMOutputWithPast  # noqa: E402

from bench.naive_remask import NaiveReMask  # noqa: E402
from composer_remask import ReMask  # noqa: E402
from composer_remask.batch import IGNORE_INDEX, ROLE_ANSWER, ROLE_CONTEXT, ROLE_RATIONALE  # noqa: E402
from composer_remask.train.model import ComposerCausalLM  # noqa: E402

METHODS = ("sft", "naive", "remask")
VOCAB = 50304
EOS_ID, MASK_ID = 0, 50281  # GPT-NeoX's EOS; a free id above the tokenizer's 50277 entries

MODELS = {
    # StableLM-shaped, small enough for 2 CPU cores; the output layer weighs what it does at scale.
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=8),
    # StableLM-3B-4e1t (REFERENCE.md): 2,795,443,200 parameters.
    "3b": dict(hidden_size=2560, intermediate_size=6912, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
}


def stablelm_config(model: str) -> StableLmConfig:
    return StableLmConfig(vocab_size=VOCAB, max_position_embeddings=4096, partial_rotary_factor=0.25,
                          rope_theta=10000, layer_norm_eps=1e-5, tie_word_embeddings=False, use_cache=False,
                          bos_token_id=EOS_ID, eos_token_id=EOS_ID, **MODELS[model])


def make_batch(rows: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """CoT-shaped rows: ~35% prompt, ~55% rationale, ~10% answer; lengths 85-100% of ``seq``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, 50000, (rows, seq), generator=g)
    roles = torch.full((rows, seq), -1, dtype=torch.int8)
    mask = torch.zeros((rows, seq), dtype=torch.long)
    for r in range(rows):
        n = int(seq * (0.85 + 0.15 * torch.rand(1, generator=g).item()))
        prompt, answer = int(0.35 * n), max(2, int(0.1 * n))
        roles[r, :prompt] = ROLE_CONTEXT
        roles[r, prompt:n - answer] = ROLE_RATIONALE
        roles[r, n - answer:n] = ROLE_ANSWER
        ids[r, n - 1] = EOS_ID
        mask[r, :n] = 1
    labels = torch.where(roles > ROLE_CONTEXT, ids, torch.tensor(IGNORE_INDEX))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "token_roles": roles}


class _BodyOnly(Algorithm):
    """Memory baseline: both passes of the decoder, no output layer and no loss worth the name."""

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.BEFORE_FORWARD, Event.AFTER_FORWARD)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.BEFORE_FORWARD:
            b = state.batch
            state.batch = {"input_ids": torch.cat([b["input_ids"]] * 2), "logits_to_keep": 1,
                           "attention_mask": torch.cat([b["attention_mask"]] * 2), "output_hidden_states": True}
        else:
            hidden = state.outputs.hidden_states[-1]
            loss = hidden.float().pow(2).mean() + 0.0 * state.outputs.logits.float().sum()
            state.outputs = CausalLMOutputWithPast(loss=loss)


class StepProbe(Callback):
    """Wall time (and CUDA peak memory above the step's start) of every training batch."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"
        self.times: list[float] = []
        self.peaks: list[int] = []
        self._t0 = 0.0
        self._m0 = 0

    def batch_start(self, state: State, logger: Logger) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._m0 = torch.cuda.memory_allocated()
        self._t0 = time.perf_counter()

    def batch_end(self, state: State, logger: Logger) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peaks.append(torch.cuda.max_memory_allocated() - self._m0)
        self.times.append(time.perf_counter() - self._t0)


def algorithms_for(method: str) -> list[Algorithm]:
    if method == "sft":
        return []
    if method == "naive":
        return [NaiveReMask(MASK_ID, [EOS_ID, MASK_ID], mask_prob=0.4, weight=0.1)]
    if method == "remask":  # the naive baseline's objective: no ReMask-CoT label rules
        return [ReMask(mask_prob=0.4, weight=0.1, mask_token_id=MASK_ID, seed=0, rationale_label_drop_prob=0.0,
                       answer_only_prob=0.0)]
    if method == "body":
        return [_BodyOnly()]
    raise ValueError(method)


def build_trainer(args, probe: StepProbe, every_method: list[Algorithm]) -> Trainer:
    torch.manual_seed(0)
    config = stablelm_config(args.model)
    init_device = "cuda" if args.device == "cuda" and not args.fsdp else "cpu"
    with torch.device(init_device):
        hf = StableLmForCausalLM(config)
    model = ComposerCausalLM(hf, tokenizer=None, train_metrics=False)
    batch = make_batch(args.batch, args.seq)
    loader = DataLoader([batch], batch_size=None)
    kwargs = {}
    if args.fsdp:
        kwargs["parallelism_config"] = {"fsdp": {
            "sharding_strategy": "FULL_SHARD", "mixed_precision": "PURE", "activation_checkpointing": True,
            "activation_checkpointing_reentrant": False, "limit_all_gathers": True, "use_orig_params": True}}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=args.device == "cuda")
    return Trainer(
        model=model, train_dataloader=loader, optimizers=optimizer, max_duration="1ba",
        algorithms=every_method, callbacks=[probe], device=args.device, progress_bar=False,
        precision="amp_bf16" if args.device == "cuda" else "fp32",
        device_train_microbatch_size=args.microbatch or args.batch, seed=0, **kwargs)


def time_methods(args) -> dict[str, dict[str, float]]:
    """Interleave single training steps of every method on one trainer; return medians."""
    probe = StepProbe(args.device)
    algos = {m: algorithms_for(m) for m in METHODS}
    trainer = build_trainer(args, probe, [a for m in METHODS for a in algos[m]])  # INIT for all
    results: dict[str, dict[str, list]] = {m: {"times": [], "peaks": []} for m in METHODS}
    for step in range(args.warmup + args.steps):
        order = METHODS[step % 3:] + METHODS[:step % 3]  # rotate who goes first
        for method in order:
            trainer.state.algorithms = list(algos[method])
            trainer.fit(duration="1ba")
            if step >= args.warmup:
                results[method]["times"].append(probe.times[-1])
                if probe.peaks:
                    results[method]["peaks"].append(probe.peaks[-1])
    trainer.close()
    del trainer
    _free_cuda(args)
    summary = {}
    for method, r in results.items():
        summary[method] = {"median_s": statistics.median(r["times"]), "min_s": min(r["times"]),
                           "max_s": max(r["times"])}
        if r["peaks"]:
            summary[method]["peak_bytes"] = max(r["peaks"])
    return summary


def probe_cpu_memory(args, method: str) -> int:
    """Peak resident bytes of one training step of ``method``, measured in a child process."""
    cmd = [sys.executable, __file__, "--memory-child", method, "--model", args.model, "--batch", str(args.batch),
           "--seq", str(args.seq)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return int(json.loads(out.strip().splitlines()[-1])["peak_bytes"])


def _read_status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def memory_child(args) -> None:
    """Run two steps of one method; report the resident peak of the second above its start."""

    class RssProbe(Callback):
        def __init__(self):
            self.peaks = []
            self.start = 0

        def batch_start(self, state, logger):
            Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark (VmHWM)
            self.start = _read_status("VmRSS:")

        def batch_end(self, state, logger):
            self.peaks.append(_read_status("VmHWM:") - self.start)

    probe = RssProbe()
    trainer = build_trainer(args, StepProbe("cpu"), algorithms_for(args.memory_child))
    trainer.state.callbacks.append(probe)
    trainer.fit(duration="1ba")
    trainer.fit(duration="1ba")
    print(json.dumps({"peak_bytes": probe.peaks[-1]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default=None, choices=sorted(MODELS), help="default: small on CPU, 3b on CUDA")
    parser.add_argument("--batch", type=int, default=None, help="rows per step (default 8 CPU, 16 CUDA)")
    parser.add_argument("--microbatch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--fsdp", action="store_true", help="CUDA: wrap with FSDP (FULL_SHARD, PURE bf16)")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model = args.model or ("3b" if args.device == "cuda" else "small")
    args.batch = args.batch or (16 if args.device == "cuda" else 8)
    if args.memory_child:
        memory_child(args)
        return
    torch.set_num_threads(torch.get_num_threads())
    timing = time_methods(args)
    if args.device == "cpu":
        for method in (*METHODS, "body"):
            timing.setdefault(method, {})["peak_bytes"] = probe_cpu_memory(args, method)
    else:
        # Body baseline on CUDA: one more step with the decoder-only loss.
        timing["body"] = {"peak_bytes": _cuda_body_peak(args)}
    body = timing["body"]["peak_bytes"]
    loss_mem = {m: timing[m]["peak_bytes"] - body for m in ("naive", "remask")}

    config = stablelm_config(args.model)
    params = sum(p.numel() for p in StableLmForCausalLM(config).parameters()) if args.model == "small" \
        else 2_795_443_200
    tokens = args.batch * args.seq
    flops_per_pass = (6 * params + 12 * config.num_hidden_layers * config.hidden_size * args.seq) * tokens
    print(f"\n{'method':<8} {'median s':>9} {'min s':>8} {'max s':>8} {'peak MiB':>9} {'x SFT':>6}")
    for method in (*METHODS, "body"):
        row = timing[method]
        if "median_s" in row:
            print(f"{method:<8} {row['median_s']:9.3f} {row['min_s']:8.3f} {row['max_s']:8.3f} "
                  f"{row['peak_bytes'] / 2**20:9.0f} {row['median_s'] / timing['sft']['median_s']:6.2f}")
        else:
            print(f"{method:<8} {'':>9} {'':>8} {'':>8} {row['peak_bytes'] / 2**20:9.0f}")
    result = {
        "remask_over_sft": timing["remask"]["median_s"] / timing["sft"]["median_s"],
        "naive_over_remask": timing["naive"]["median_s"] / timing["remask"]["median_s"],
        "loss_memory_over_naive": loss_mem["remask"] / loss_mem["naive"],
        "loss_memory_mib": {m: v / 2**20 for m, v in loss_mem.items()},
        "median_step_s": {m: timing[m]["median_s"] for m in METHODS},
        "peak_mib": {m: timing[m]["peak_bytes"] / 2**20 for m in (*METHODS, "body")},
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({platform.processor() or 'x86_64'}, "
                  f"{torch.get_num_threads()} threads)",
        "model": args.model, "params": params, "vocab": VOCAB, "batch": args.batch, "seq": args.seq,
        "microbatch": args.microbatch or args.batch, "steps": args.steps, "fsdp": args.fsdp,
    }
    if args.device == "cuda":
        peak = 989.5e12  # H100 SXM bf16 dense, as Composer's SpeedMonitor
        result["mfu"] = {m: (flops_per_pass * (1 if m == "sft" else 2)) / timing[m]["median_s"] / peak
                         for m in METHODS}
        result["tokens_per_s"] = {m: tokens / timing[m]["median_s"] for m in METHODS}
    print(json.dumps(result))


def _cuda_body_peak(args) -> int:
    probe = StepProbe("cuda")
    trainer = build_trainer(args, probe, algorithms_for("body"))
    trainer.fit(duration="1ba")
    trainer.fit(duration="1ba")
    trainer.close()
    return probe.peaks[-1]


def _free_cuda(args) -> None:
    """Release the timing run's model and optimizer before the next one (3B: ~45 GB)."""
    import gc

    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
