"""The ReMask loss alone (CE x 2 + sym-KL, forward + backward): the lean loss against its floor and naive.

Methods, all on the same gathered rows (N predicted rows per pass, hidden size d, vocabulary V):

- ``floor``: the three matmuls per pass any exact method needs (logits, gradient of the hidden
  rows, gradient of the output weight), into preallocated outputs, nothing else;
- ``lean``: ``composer_remask.remask.loss.remask_loss_from_rows`` from hidden rows and the output weight;
- ``naive``: full logits of both passes, ``log_softmax``, the textbook formulas, autograd;
- ``naive_compile``: ``naive`` under ``torch.compile`` (compilation excluded from the times);
- ``liger`` (CUDA, when ``liger-kernel`` is installed): Liger's fused linear CE on both passes,
  without the divergence (a lower bound for a fused-CE approach, not the same objective).

Times are medians of interleaved rounds (each round runs every method once, so machine noise hits
all of them alike), after one warm-up call each. Peak memory is measured per method in the same
process: on the CPU the resident-set high-water mark is reset (``/proc/self/clear_refs``) after
freed memory is returned to the system (``malloc_trim``), and the peak is counted above the memory
held before the call (inputs and weights excluded, the gradients included); on CUDA the
allocator's peak. "Working" memory is that peak less the gradients every method must return
(both hidden rows and the output weight: at the default shape the weight's fp32 gradient alone is
197 MiB, which is why even the floor's peak is a third of naive's). The scaling table repeats
floor / lean / naive over other (N, V), one round each without a warm-up.

    python bench/loss_bench.py                   # N=512, d=1024, V=50304, fp32, 5 rounds + scaling table
    python bench/loss_bench.py --quick           # small shapes, a few seconds
    python bench/loss_bench.py --device cuda --dtype bf16

The last line printed is one JSON object with ``lean_over_floor``, ``naive_over_lean`` and
``lean_memory_over_naive`` for the main shape, the times, peaks, the scaling rows and the load.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from composer_remask.remask.divergences import token_divergence
from composer_remask.remask.loss import remask_loss_from_rows

DIVERGENCE_WEIGHT = 0.1
DEFAULT_SCALING = ((256, 32768), (2048, 32768), (512, 65536), (1024, 65536), (256, 131072), (256, 262144))
QUICK_SCALING = ((64, 2048), (128, 4096))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Case:
    """Inputs of one shape: hidden rows of both passes, the output weight, targets and divergence rows."""

    def __init__(self, rows: int, hidden: int, vocab: int, device: str, dtype: torch.dtype, seed: int = 0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.rows, self.hidden, self.vocab = rows, hidden, vocab
        self.hidden_full = torch.randn(rows, hidden, generator=g).to(device, dtype).requires_grad_()
        masked = self.hidden_full.detach().float().cpu() + 0.5 * torch.randn(rows, hidden, generator=g)
        self.hidden_masked = masked.to(device, dtype).requires_grad_()
        self.weight = (torch.randn(vocab, hidden, generator=g) * 0.02).to(device, dtype).requires_grad_()
        targets = torch.randint(vocab, (rows,), generator=g)
        targets[torch.rand(rows, generator=g) < 0.05] = -100  # rows that only count for the divergence
        self.targets = targets.to(device)
        self.div_rows = torch.ones(rows, dtype=torch.bool, device=device)
        self.ce_scale = 1.0 / max(int((targets != -100).sum()), 1)
        self.div_scale = 1.0 / rows
        self.grad_logits = (torch.randn(rows, vocab, generator=g) * 1e-4).to(device, dtype)  # for the floor

    def inputs(self) -> list[torch.Tensor]:
        return [self.hidden_full, self.hidden_masked, self.weight]

    def zero_grads(self) -> None:
        for tensor in self.inputs():
            tensor.grad = None

    def gradient_bytes(self) -> int:
        """What every method must hand back: the gradients of both hidden rows and of the output weight."""
        return sum(t.numel() * t.element_size() for t in self.inputs())


def run_floor(case: Case) -> None:
    """Three products per pass into preallocated outputs: logits, grad-hidden, grad-weight (written, then addmm_)."""
    weight = case.weight.detach()
    logits = torch.empty(case.rows, case.vocab, dtype=weight.dtype, device=weight.device)
    grad_hidden = torch.empty(case.rows, case.hidden, dtype=weight.dtype, device=weight.device)
    grad_weight = torch.empty(case.vocab, case.hidden, dtype=torch.float32, device=weight.device)
    with torch.no_grad():
        for i, rows in enumerate((case.hidden_full.detach(), case.hidden_masked.detach())):
            torch.mm(rows, weight.t(), out=logits)
            torch.mm(case.grad_logits, weight, out=grad_hidden)
            if grad_weight.dtype != weight.dtype:
                grad_weight.copy_(case.grad_logits.t() @ rows) if i == 0 else grad_weight.add_(case.grad_logits.t() @ rows)
            elif i == 0:
                torch.mm(case.grad_logits.t(), rows, out=grad_weight)
            else:
                grad_weight.addmm_(case.grad_logits.t(), rows)


def lean_loss(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    total, sums = remask_loss_from_rows(
        case.hidden_full, case.hidden_masked, case.targets, case.div_rows, divergence_weight=DIVERGENCE_WEIGHT,
        divergence="sym_kl", detach_full=False, ce_scale=case.ce_scale, div_scale=case.div_scale,
        head_weight=case.weight)
    return total, sums.divergence


def naive_loss(hidden_full, hidden_masked, weight, targets, div_rows, ce_scale: float, div_scale: float):
    """The straightforward objective: full logits, log-softmax, textbook formulas (autograd does the rest)."""
    logp_full = torch.log_softmax((hidden_full @ weight.t()).float(), dim=-1)
    logp_masked = torch.log_softmax((hidden_masked @ weight.t()).float(), dim=-1)
    ce_full = F.nll_loss(logp_full, targets, ignore_index=-100, reduction="sum")
    ce_masked = F.nll_loss(logp_masked, targets, ignore_index=-100, reduction="sum")
    div = (token_divergence(logp_full, logp_masked, "sym_kl") * div_rows).sum()
    return 0.5 * ce_scale * (ce_full + ce_masked) + DIVERGENCE_WEIGHT * div_scale * div, div.detach()


_compiled_naive = None


def naive_compile_loss(case: Case):
    global _compiled_naive
    if _compiled_naive is None:
        _compiled_naive = torch.compile(naive_loss)
    return _compiled_naive(case.hidden_full, case.hidden_masked, case.weight, case.targets, case.div_rows,
                           case.ce_scale, case.div_scale)


def liger_loss(case: Case):
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    ce = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="mean")
    total = 0.5 * (ce(case.weight, case.hidden_full, case.targets) + ce(case.weight, case.hidden_masked, case.targets))
    return total, total.detach()


def _backward(loss_fn: Callable[[Case], tuple[torch.Tensor, torch.Tensor]]) -> Callable[[Case], None]:
    def step(case: Case) -> None:
        total, _ = loss_fn(case)
        total.backward()
    return step


def methods_for(names: list[str]) -> dict[str, Callable[[Case], None]]:
    table = {
        "floor": run_floor,
        "lean": _backward(lean_loss),
        "naive": _backward(lambda c: naive_loss(c.hidden_full, c.hidden_masked, c.weight, c.targets, c.div_rows,
                                                c.ce_scale, c.div_scale)),
        "naive_compile": _backward(naive_compile_loss),
        "liger": _backward(liger_loss),
    }
    return {name: table[name] for name in names}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _status_kib(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def peak_bytes(step: Callable[[Case], None], case: Case, device: str) -> int:
    """Peak memory one call adds above what is held before it."""
    case.zero_grads()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(case)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed memory back to the system, so the peak is this call's
        Path("/proc/self/clear_refs").write_text("5")  # reset the resident high-water mark
        before = _status_kib("VmRSS")
        step(case)
        peak = (_status_kib("VmHWM") - before) * 1024
    case.zero_grads()
    return peak


def measure(case: Case, methods: dict[str, Callable[[Case], None]], rounds: int, device: str,
            warmup: bool = True) -> tuple[dict[str, float], dict[str, int]]:
    """Median seconds of interleaved rounds and the peak bytes of one call, per method."""
    if warmup:
        for step in methods.values():
            step(case)
            case.zero_grads()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, step in methods.items():
            _sync(device)
            start = time.perf_counter()
            step(case)
            _sync(device)
            times[name].append(time.perf_counter() - start)
            case.zero_grads()
    peaks = {name: peak_bytes(step, case, device) for name, step in methods.items()}
    return {name: statistics.median(ts) for name, ts in times.items()}, peaks


def agreement(case: Case) -> dict[str, float]:
    """Lean against naive: relative difference of the total and the largest gradient difference."""
    case.zero_grads()
    lean_total, _ = lean_loss(case)
    lean_total.backward()
    lean_grads = [t.grad.float().clone() for t in case.inputs()]
    case.zero_grads()
    naive_total, _ = naive_loss(case.hidden_full, case.hidden_masked, case.weight, case.targets, case.div_rows,
                                case.ce_scale, case.div_scale)
    naive_total.backward()
    grad_diff = max((mine - t.grad.float()).abs().max().item() for mine, t in zip(lean_grads, case.inputs()))
    grad_scale = max(t.grad.float().abs().max().item() for t in case.inputs())
    case.zero_grads()
    return {"total_rel_diff": abs(lean_total.item() - naive_total.item()) / abs(naive_total.item()),
            "max_grad_abs_diff": grad_diff, "max_grad_abs": grad_scale}


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> dict:
    args = _parse_args(argv)
    dtype = DTYPES[args.dtype]
    names = _method_names(args)
    load_before = load_average()
    print(f"device {args.device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
          f"torch {torch.__version__}, {args.dtype}; load average before: {load_before}", flush=True)
    case = Case(args.rows, args.hidden, args.vocab, args.device, dtype)
    check = agreement(case)
    print(f"lean vs naive: total rel diff {check['total_rel_diff']:.1e}, max |grad diff| "
          f"{check['max_grad_abs_diff']:.1e} (max |grad| {check['max_grad_abs']:.1e})", flush=True)
    times, peaks = measure(case, methods_for(names), args.rounds, args.device)
    working = {name: max(peak - case.gradient_bytes(), 0) for name, peak in peaks.items()}
    _print_main_table(args, names, times, peaks, working)
    del case
    scaling = [] if args.no_scaling else _scaling_table(args, dtype)
    result = {
        "shape": {"rows": args.rows, "hidden": args.hidden, "vocab": args.vocab, "dtype": args.dtype},
        "device": args.device, "threads": torch.get_num_threads(), "rounds": args.rounds,
        "lean_over_floor": times["lean"] / times["floor"],
        "naive_over_lean": times["naive"] / times["lean"],
        "naive_compile_over_lean": times["naive_compile"] / times["lean"] if "naive_compile" in times else None,
        "lean_memory_over_naive": peaks["lean"] / max(peaks["naive"], 1),
        "lean_working_memory_over_naive": working["lean"] / max(working["naive"], 1),
        "times_s": times, "peak_mib": {name: peak / 2**20 for name, peak in peaks.items()},
        "working_mib": {k: v / 2**20 for k, v in working.items()},
        "agreement": check, "load_average_before": load_before,
        "scaling": scaling, "lean_faster_than_naive_everywhere": all(r["naive_over_lean"] > 1 for r in scaling)
        and times["naive"] > times["lean"],
        "load_average_after": load_average(),
    }
    print(json.dumps(result))
    return result


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=512, help="predicted rows per pass (N)")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size (d)")
    parser.add_argument("--vocab", type=int, default=50304, help="vocabulary size (V)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds for the main shape")
    parser.add_argument("--scaling-rounds", type=int, default=1, help="rounds per scaling shape")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--no-compile", action="store_true", help="skip naive under torch.compile")
    parser.add_argument("--no-scaling", action="store_true", help="skip the scaling table")
    parser.add_argument("--quick", action="store_true", help="small shapes and rounds (a smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.hidden, args.vocab, args.rounds = 128, 256, 8192, 2
    return args


def _method_names(args: argparse.Namespace) -> list[str]:
    """The methods measured: Liger's fused loss only on CUDA where it is installed."""
    names = ["floor", "lean", "naive"] + ([] if args.no_compile else ["naive_compile"])
    if args.device == "cuda":
        try:
            import liger_kernel  # noqa: F401
            names.append("liger")
        except ImportError:
            pass
    return names


def _print_main_table(args: argparse.Namespace, names: list[str], times: dict[str, float], peaks: dict[str, int],
                      working: dict[str, int]) -> None:
    print(f"\nCE x 2 + sym-KL, forward + backward; N={args.rows} rows per pass, d={args.hidden}, V={args.vocab}, "
          f"{args.dtype}; median of {args.rounds} interleaved rounds")
    print("| method | time (s) | / floor | peak (MiB) | / naive peak | working (MiB) | / naive working |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    for name in names:
        print(f"| {name} | {times[name]:.3f} | {times[name] / times['floor']:.2f} | {peaks[name] / 2**20:.0f} | "
              f"{peaks[name] / max(peaks['naive'], 1):.2f} | {working[name] / 2**20:.0f} | "
              f"{working[name] / max(working['naive'], 1):.2f} |")


def _scaling_table(args: argparse.Namespace, dtype: torch.dtype) -> list[dict]:
    """floor, lean and naive over the scaling shapes (rows x vocabulary), one row each, printed as it goes."""
    table_methods = methods_for(["floor", "lean", "naive"])
    print(f"\nscaling (d={args.hidden}, median of {args.scaling_rounds} round(s), no warm-up)")
    print("| N | V | floor (s) | lean (s) | naive (s) | lean / floor | naive / lean | lean / naive peak |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- |")
    scaling = []
    for rows, vocab in QUICK_SCALING if args.quick else DEFAULT_SCALING:
        shape_case = Case(rows, args.hidden, vocab, args.device, dtype)
        t, p = measure(shape_case, table_methods, args.scaling_rounds, args.device, warmup=False)
        row = {"rows": rows, "vocab": vocab, "times_s": t, "peak_mib": {k: v / 2**20 for k, v in p.items()},
               "lean_over_floor": t["lean"] / t["floor"], "naive_over_lean": t["naive"] / t["lean"],
               "lean_memory_over_naive": p["lean"] / max(p["naive"], 1)}
        scaling.append(row)
        print(f"| {rows} | {vocab} | {t['floor']:.3f} | {t['lean']:.3f} | {t['naive']:.3f} | "
              f"{row['lean_over_floor']:.2f} | {row['naive_over_lean']:.2f} | "
              f"{row['lean_memory_over_naive']:.2f} |", flush=True)
        del shape_case
    return scaling


if __name__ == "__main__":
    main()
