"""The loss benchmark's quick run: its last line is the JSON the notes quote, and lean agrees with naive."""

from __future__ import annotations

import json

from bench import loss_bench


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
    assert agreement["total_rel_diff"] < 1e-5
    assert agreement["max_grad_abs_diff"] <= 1e-5 * agreement["max_grad_abs"]
    # Lean never holds the full logits of both passes, so its peak stays under naive's.
    assert result["peak_mib"]["lean"] < result["peak_mib"]["naive"]
