"""The loss benchmark's quick run: its last line is the JSON the notes quote, and lean agrees with naive."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from bench import loss_bench
from tests.helpers.tolerances import ROUNDING_GROWTH, measured_floor


def _naive_float32_rounding() -> tuple[float, float]:
    """The quick run's case (same shape and seed): how far the naive float32 loss (relative) and its
    gradients lie from the same formulas in float64."""
    case = loss_bench.Case(128, 256, 8192, "cpu", torch.float32)
    naive32, _ = loss_bench.naive_loss(case.hidden_full, case.hidden_masked, case.weight, case.targets, case.div_rows,
                                       case.ce_scale, case.div_scale)
    naive32.backward()
    inputs64 = [t.detach().double().requires_grad_() for t in case.inputs()]
    full, masked, weight = inputs64
    logp_full, logp_masked = (torch.log_softmax(rows @ weight.t(), dim=-1) for rows in (full, masked))
    ce = sum(F.nll_loss(logp, case.targets, ignore_index=-100, reduction="sum") for logp in (logp_full, logp_masked))
    div = (loss_bench.token_divergence(logp_full, logp_masked, "sym_kl") * case.div_rows).sum()
    naive64 = 0.5 * case.ce_scale * ce + loss_bench.DIVERGENCE_WEIGHT * case.div_scale * div
    naive64.backward()
    total_floor = measured_floor(naive32.item(), naive64.item()) / abs(naive64.item())
    grad_floor = max(measured_floor(t.grad, t64.grad) for t, t64 in zip(case.inputs(), inputs64))
    return total_floor, grad_floor


def test_quick_run_prints_the_ratios_and_lean_matches_naive(capsys):
    loss_bench.main(["--quick", "--no-compile", "--rounds", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    for key in ("lean_over_floor", "naive_over_lean", "lean_memory_over_naive", "lean_working_memory_over_naive"):
        assert isinstance(result[key], float) and result[key] > 0, key
    assert set(result["times_s"]) == {"floor", "lean", "naive"}
    assert result["shape"] == {"rows": 128, "hidden": 256, "vocab": 8192, "dtype": "fp32"}
    assert [(row["rows"], row["vocab"]) for row in result["scaling"]] == list(loss_bench.QUICK_SCALING)
    for row in result["scaling"]:
        assert {"lean_over_floor", "naive_over_lean", "lean_memory_over_naive"} <= set(row)
    # Same objective: the lean loss's total and gradients are the naive autograd ones.
    agreement = result["agreement"]
    total_floor, grad_floor = _naive_float32_rounding()
    print(f"lean vs naive: total rel diff {agreement['total_rel_diff']:.1e} (naive's float32 rounding {total_floor:.1e}), "
          f"max |grad diff| {agreement['max_grad_abs_diff']:.1e} (naive's float32 rounding {grad_floor:.1e})")
    # Two float32 routes to one objective: each within ROUNDING_GROWTH times naive's rounding, so 2x that apart.
    assert agreement["total_rel_diff"] <= 2 * ROUNDING_GROWTH * total_floor
    assert agreement["max_grad_abs_diff"] <= 2 * ROUNDING_GROWTH * grad_floor
    # Lean never holds the full logits of both passes, so its peak stays under naive's.
    assert result["peak_mib"]["lean"] < result["peak_mib"]["naive"]
