"""Step time and memory of SFT, lean SFT, a naive ReMask and composer_remask.ReMask, side by side.

- ``sft``: no algorithm; the Hugging Face loss (full logits at every position);
- ``lean_sft``: ``ReMask(mask_prob=0)``, the same loss code as ReMask with one pass: the output
  layer runs at predicted positions only and full logits are never materialized;
- ``naive``: ReMask written the straightforward way (``bench/naive_remask.py``);
- ``remask``: ``ReMask()``, two passes.

ReMask over lean SFT is the honest price of the second pass (about 2 by FLOPs); ReMask over
HF-default SFT is lower because that baseline spends FLOPs and memory on logits at unpredicted
positions. One model, one batch, one ``composer.Trainer``; the methods take turns step by step
(the algorithm list is swapped between one-batch ``fit`` calls), so machine noise hits all of them
alike. Peak memory: on CUDA from the allocator, in the same run; on the CPU each method runs in a
child process with a fixed mmap threshold, so resident memory tracks live tensors.

    python -m bench.step_bench                       # CPU, StableLM-shaped, vocab 50304, seq 256
    python -m bench.step_bench --device cuda --model 3b --batch 16 [--fsdp]

(from the repository root: the bench imports ``bench.naive_remask``). ``--model 3b`` is
StableLM-3B-4e1t's architecture from the config in ``bench/model_configs`` (random weights,
nothing downloaded). The last line printed is one
JSON object (ratios, medians, memory, tokens/s, MFU, device, shapes); ``--json PATH`` also writes it.
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

import torch
from composer import Trainer
from composer.callbacks.speed_monitor import get_gpu_flops_available
from composer.core import Algorithm, Callback, Event, Precision, State
from composer.loggers import Logger
from torch.utils.data import DataLoader
from transformers import AutoConfig, StableLmConfig, StableLmForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from bench.naive_remask import NaiveReMask
from composer_remask import ReMask
from composer_remask.batch import IGNORE_INDEX, ROLE_ANSWER, ROLE_CONTEXT, ROLE_PAD, ROLE_RATIONALE
from composer_remask.remask.masking import MaskVocabulary, remask_batch
from composer_remask.train.model import ComposerCausalLM

METHODS = ("sft", "lean_sft", "naive", "remask", "remask_stacked")
# Forward+backward passes per step; ReMask's is what its chosen layout runs (summarize).
PASSES = {"sft": 1, "lean_sft": 1, "naive": 2, "remask": 2, "remask_stacked": 2}
VOCAB = 50304
EOS_ID, MASK_ID = 0, 50281  # GPT-NeoX's EOS; a free id above the tokenizer's 50277 entries

MODELS = {
    # StableLM-shaped, small enough for 2 CPU cores; the output layer weighs what it does at scale.
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=8),
    # For dry runs of the GPU check: seconds per step on a CPU.
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4),
}
# Architectures measured without their weights: config.json folders under bench/model_configs/.
REPO = Path(__file__).resolve().parents[1]
MODEL_CONFIGS = REPO / "bench" / "model_configs"
SHIPPED = {"3b": "stablelm-3b-4e1t"}  # 2,795,443,200 parameters


def stablelm_config(model: str) -> StableLmConfig:
    if model in SHIPPED:
        config = AutoConfig.from_pretrained(MODEL_CONFIGS / SHIPPED[model])
        config.use_cache = False
        return config
    return StableLmConfig(vocab_size=VOCAB, max_position_embeddings=4096, partial_rotary_factor=0.25,
                          rope_theta=10000, layer_norm_eps=1e-5, tie_word_embeddings=False, use_cache=False,
                          bos_token_id=EOS_ID, eos_token_id=EOS_ID, **MODELS[model])


def count_parameters(config: StableLmConfig) -> int:
    """Parameters of the architecture, counted on the meta device (no memory, no init time)."""
    with torch.device("meta"):
        return sum(p.numel() for p in StableLmForCausalLM(config).parameters())


def flops_per_pass(config: StableLmConfig, params: int, rows: int, seq: int) -> float:
    """Training FLOPs of one forward+backward pass: (6 N + 12 L d T) per token (PaLM, appendix B)."""
    return float((6 * params + 12 * config.num_hidden_layers * config.hidden_size * seq) * rows * seq)


def peak_flops(device: str) -> float | None:
    """The card's bf16 dense peak as Composer's SpeedMonitor knows it (None off CUDA or if unknown)."""
    if device != "cuda":
        return None
    import types

    value = get_gpu_flops_available(types.SimpleNamespace(precision=Precision.AMP_BF16))
    return float(value) if value else None


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


# Card-shaped CoT rows (GSM8K-like): token lengths of the question with its template, the rationale
# and the answer with its tag and EOS; a normal draw per row, clipped to a plausible range.
COT_LENGTHS = {"prompt": (60, 20, 20, 150), "rationale": (110, 45, 20, 220), "answer": (6, 2, 3, 12)}


def make_cot_batch(rows: int, max_seq_len: int = 256, seed: int = 0) -> dict[str, torch.Tensor]:
    """GSM8K-shaped rows (prompt, rationale, answer), cut to ``max_seq_len`` and padded to the longest
    row (``pad_to: longest``), with token roles as the project's collator writes them."""
    g = torch.Generator().manual_seed(seed)

    def draw(part: str) -> int:
        mean, std, low, high = COT_LENGTHS[part]
        return int(min(high, max(low, round(mean + std * torch.randn(1, generator=g).item()))))

    spans = []
    for _ in range(rows):
        prompt, rationale, answer = draw("prompt"), draw("rationale"), draw("answer")
        rationale = max(1, min(rationale, max_seq_len - prompt - answer))
        spans.append((prompt, rationale, answer))
    width = max(sum(span) for span in spans)
    ids = torch.randint(100, 50000, (rows, width), generator=g)
    roles = torch.full((rows, width), ROLE_PAD, dtype=torch.int8)
    mask = torch.zeros((rows, width), dtype=torch.long)
    for r, (prompt, rationale, answer) in enumerate(spans):
        n = prompt + rationale + answer
        roles[r, :prompt] = ROLE_CONTEXT
        roles[r, prompt:prompt + rationale] = ROLE_RATIONALE
        roles[r, prompt + rationale:n] = ROLE_ANSWER
        ids[r, n - 1] = EOS_ID
        mask[r, :n] = 1
    labels = torch.where(roles > ROLE_CONTEXT, ids, torch.tensor(IGNORE_INDEX))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "token_roles": roles}


def prefix_opportunity(batch: dict[str, torch.Tensor], mask_prob: float = 0.4, seed: int = 0,
                       config: StableLmConfig | None = None) -> dict[str, float]:
    """What the shared-prefix layout saves on ``batch`` under the card's masks and label rules.

    In a masked row every position before its first masked token sees exactly the full row's inputs
    (causal attention), so a stacked masked pass recomputes it for nothing; a row with no masked
    token needs no masked pass at all. Shares are of the masked pass's positions (rows x padded
    length): ``prefix_share`` (before each row's first masked token, or the whole row without one),
    ``padding_share``, and what is left, the suffixes. ``position_floor_over_lean_sft`` is 1 + the
    suffix share: the decoder positions of a shared-prefix step over a lean SFT step's.
    ``flop_floor_over_lean_sft`` (with ``config``) counts the dense FLOPs of both steps (6 x
    parameters per position; attention's quadratic term left out): the decoder over every position
    lean SFT pads to, against the real positions and the suffixes, plus the output layer at the
    predicted positions, once for lean SFT and once per pass for ReMask (both passes' logits are
    needed at every predicted position).
    """
    vocabulary = MaskVocabulary("mask_token", MASK_ID, EOS_ID, torch.tensor([EOS_ID, MASK_ID]))
    masked = remask_batch(batch["input_ids"], batch["labels"], batch["token_roles"], batch["attention_mask"],
                          mask_prob=mask_prob, vocabulary=vocabulary, seed=seed, rationale_label_drop_prob=0.1,
                          answer_only_prob=0.1)
    lengths = batch["attention_mask"].sum(dim=1)
    rows, width = batch["input_ids"].shape
    any_masked = masked.input_mask.any(dim=1)
    first = torch.where(any_masked, masked.input_mask.int().argmax(dim=1), lengths)
    total = float(rows * width)
    prefix = float(first.sum()) / total
    padding = float((width - lengths).sum()) / total
    suffix = 1.0 - prefix - padding
    found = {"prefix_share": prefix, "padding_share": padding, "suffix_share": suffix,
             "rows_without_a_masked_token": int((~any_masked).sum()), "position_floor_over_lean_sft": 1.0 + suffix}
    if config is not None:
        head = config.vocab_size * config.hidden_size  # the output layer; the embedding costs no FLOPs
        body = count_parameters(config) - head - (0 if config.tie_word_embeddings else head)
        # Positions whose output the loss reads: the labelled ones (a dropped label keeps its divergence term).
        predicted = float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        lean = body * total + head * predicted
        shared = body * (float(lengths.sum()) + suffix * total) + head * 2 * predicted
        found["flop_floor_over_lean_sft"] = shared / lean
    return found


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


def algorithms_for(method: str, mask_prob: float = 0.4) -> list[Algorithm]:
    if method == "sft":
        return []
    if method == "lean_sft":  # one pass through ReMask's loss code: predicted positions only
        return [ReMask(mask_prob=0.0, weight=0.1, mask_token_id=MASK_ID, seed=0, rationale_label_drop_prob=0.0,
                       answer_only_prob=0.0)]
    if method == "naive":
        return [NaiveReMask(MASK_ID, [EOS_ID, MASK_ID], mask_prob=mask_prob, weight=0.1)]
    if method in ("remask", "remask_stacked"):  # the naive baseline's objective: no ReMask-CoT label rules
        # remask: the layout ReMask chooses by itself; remask_stacked: today's [full; masked], forced.
        layout = "stacked" if method == "remask_stacked" else "auto"
        return [ReMask(mask_prob=mask_prob, weight=0.1, mask_token_id=MASK_ID, seed=0, rationale_label_drop_prob=0.0,
                       answer_only_prob=0.0, forward_layout=layout)]
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
    batch = bench_batch(args)
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


def bench_batch(args) -> dict[str, torch.Tensor]:
    """The one batch every method trains on: ``--data synthetic`` (``--seq`` long rows) or ``cot``."""
    if args.data == "cot":
        return make_cot_batch(args.batch, args.seq)
    return make_batch(args.batch, args.seq)


def time_methods(args) -> dict[str, dict[str, float]]:
    """Interleave single training steps of every method on one trainer; return medians."""
    methods = tuple(args.methods)
    probe = StepProbe(args.device)
    algos = {m: algorithms_for(m, args.mask_prob) for m in methods}
    trainer = build_trainer(args, probe, [a for m in methods for a in algos[m]])  # INIT for all
    results: dict[str, dict[str, list]] = {m: {"times": [], "peaks": []} for m in methods}
    for step in range(args.warmup + args.steps):
        shift = step % len(methods)
        for method in methods[shift:] + methods[:shift]:  # rotate who goes first
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
        layouts = [a.forward_layout_in_use for a in algos[method] if isinstance(a, ReMask)]
        if layouts:
            summary[method]["layout"] = layouts[0]
    return summary


def probe_cpu_memory(args, method: str) -> int:
    """Peak resident bytes of one training step of ``method``, measured in a child process."""
    cmd = [sys.executable, "-m", "bench.step_bench", "--memory-child", method, "--model", args.model, "--batch", str(args.batch),
           "--seq", str(args.seq), "--data", args.data, "--mask-prob", str(args.mask_prob)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    child = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if child.returncode != 0:
        raise RuntimeError(f"memory probe of {method} failed ({child.returncode}):\n{child.stderr[-3000:]}")
    return int(json.loads(child.stdout.strip().splitlines()[-1])["peak_bytes"])


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
    trainer = build_trainer(args, StepProbe("cpu"), algorithms_for(args.memory_child, args.mask_prob))
    trainer.state.callbacks.append(probe)
    trainer.fit(duration="1ba")
    trainer.fit(duration="1ba")
    print(json.dumps({"peak_bytes": probe.peaks[-1]}))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default=None, choices=sorted([*MODELS, *SHIPPED]),
                        help="default: small on CPU, 3b (StableLM-3B-4e1t's shipped config) on CUDA")
    parser.add_argument("--batch", type=int, default=None, help="rows per step (default 8 CPU, 16 CUDA)")
    parser.add_argument("--microbatch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=256, help="row length (--data cot: max_seq_len, rows padded "
                                                              "to the longest)")
    parser.add_argument("--data", choices=("synthetic", "cot"), default="synthetic",
                        help="synthetic: rows of ~--seq tokens; cot: GSM8K-shaped question/rationale/answer rows")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--mask-prob", type=float, default=0.4,
                        help="ReMask's mask rate (1.0: every row masked from its first response token, where "
                             "sharing the prefix saves least)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                        help="methods to time (sft is always included: every ratio is over it)")
    parser.add_argument("--fsdp", action="store_true", help="CUDA: wrap with FSDP (FULL_SHARD, PURE bf16)")
    parser.add_argument("--no-memory", action="store_true", help="CPU: skip the per-method memory children")
    parser.add_argument("--json", default=None, help="also write the result JSON to this file")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.model = args.model or ("3b" if args.device == "cuda" else "small")
    args.batch = args.batch or (16 if args.device == "cuda" else 8)
    args.methods = [m for m in METHODS if m in {"sft", *args.methods}]
    if args.fsdp and args.device != "cuda":
        parser.error("--fsdp needs --device cuda (Composer's FSDP runs on CUDA only)")
    return args


def summarize(args, timing: dict[str, dict[str, float]]) -> dict:
    """Ratios, tokens/s, MFU (passes counted) and memory, as the JSON line reports them."""
    methods = args.methods
    config = stablelm_config(args.model)
    params = count_parameters(config)
    batch = bench_batch(args)
    tokens = int(batch["input_ids"].numel())
    seq = int(batch["input_ids"].shape[1])
    one_pass = flops_per_pass(config, params, args.batch, seq)
    peak = peak_flops(args.device)
    median = {m: timing[m]["median_s"] for m in methods}
    result: dict = {}
    if "remask" in methods:
        result["remask_over_sft"] = median["remask"] / median["sft"]
        if "lean_sft" in methods:
            result["remask_over_lean_sft"] = median["remask"] / median["lean_sft"]
        if "naive" in methods:
            result["naive_over_remask"] = median["naive"] / median["remask"]
    if "lean_sft" in methods:
        result["lean_sft_over_sft"] = median["lean_sft"] / median["sft"]
    if "remask_stacked" in methods:
        if "lean_sft" in methods:
            result["remask_stacked_over_lean_sft"] = median["remask_stacked"] / median["lean_sft"]
        if "remask" in methods:
            result["remask_over_remask_stacked"] = median["remask"] / median["remask_stacked"]
    opportunity = prefix_opportunity(batch, mask_prob=args.mask_prob, config=config)
    layout = timing.get("remask", {}).get("layout", "stacked")
    passes = dict(PASSES, remask=opportunity["flop_floor_over_lean_sft"] if layout == "shared_prefix" else 2)
    with_peaks = [m for m in (*methods, "body") if "peak_bytes" in timing.get(m, {})]
    if "body" in with_peaks:
        body = timing["body"]["peak_bytes"]
        loss_mem = {m: timing[m]["peak_bytes"] - body for m in methods if m != "sft" and m in with_peaks}
        if "naive" in loss_mem and "remask" in loss_mem:
            result["loss_memory_over_naive"] = loss_mem["remask"] / loss_mem["naive"]
        result["loss_memory_mib"] = {m: v / 2**20 for m, v in loss_mem.items()}
    result["median_step_s"] = median
    result["peak_mib"] = {m: timing[m]["peak_bytes"] / 2**20 for m in with_peaks}
    result["tokens_per_s"] = {m: tokens / median[m] for m in methods}
    result["tflops_per_s"] = {m: one_pass * passes[m] / median[m] / 1e12 for m in methods}
    if peak:
        result["mfu"] = {m: one_pass * passes[m] / median[m] / peak for m in methods}
        result["peak_tflops"] = peak / 1e12
    result.update({
        "passes": {m: passes[m] for m in methods},
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({platform.processor() or 'x86_64'}, "
                  f"{torch.get_num_threads()} threads)",
        "load_average": list(os.getloadavg()), "cpu_count": os.cpu_count(),
        "model": args.model, "params": params, "vocab": config.vocab_size, "batch": args.batch, "seq": args.seq,
        "microbatch": args.microbatch or args.batch, "steps": args.steps, "mask_prob": args.mask_prob, "fsdp": args.fsdp,
        "precision": "amp_bf16" if args.device == "cuda" else "fp32", "data": args.data, "padded_seq": seq,
        # The layout ReMask chose by itself, and what sharing the prefix can save on this batch.
        "layout": layout, **opportunity,
    })
    return result


def print_table(args, timing: dict[str, dict[str, float]], result: dict) -> None:
    print(f"\n{'method':<9} {'median s':>9} {'min s':>8} {'max s':>8} {'peak MiB':>9} {'x SFT':>6} {'tok/s':>9}"
          f"{'  MFU':>7}")
    for method in (*args.methods, "body"):
        row = timing.get(method)
        if row is None:
            continue
        peak = f"{row['peak_bytes'] / 2**20:9.0f}" if "peak_bytes" in row else f"{'':>9}"
        if "median_s" in row:
            mfu = f"{result['mfu'][method]:7.1%}" if "mfu" in result else f"{'':>7}"
            print(f"{method:<9} {row['median_s']:9.3f} {row['min_s']:8.3f} {row['max_s']:8.3f} {peak} "
                  f"{row['median_s'] / timing['sft']['median_s']:6.2f} {result['tokens_per_s'][method]:9.0f}{mfu}")
        else:
            print(f"{method:<9} {'':>9} {'':>8} {'':>8} {peak}")


def run(args: argparse.Namespace) -> dict:
    timing = time_methods(args)
    if args.device == "cpu":
        if not args.no_memory:
            for method in (*args.methods, "body"):
                timing.setdefault(method, {})["peak_bytes"] = probe_cpu_memory(args, method)
    else:
        timing["body"] = {"peak_bytes": _cuda_body_peak(args)}  # one more step with the decoder-only loss
    result = summarize(args, timing)
    print_table(args, timing, result)
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.memory_child:
        memory_child(args)
        return
    result = run(args)
    line = json.dumps(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(line + "\n")
    print(line)


def _cuda_body_peak(args) -> int:
    probe = StepProbe("cuda")
    trainer = build_trainer(args, probe, algorithms_for("body"))
    trainer.fit(duration="1ba")
    trainer.fit(duration="1ba")
    trainer.close()
    del trainer
    _free_cuda(args)
    return probe.peaks[-1]


def _free_cuda(args) -> None:
    """Release the timing run's model and optimizer before the next one (3B: ~45 GB)."""
    import gc

    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
