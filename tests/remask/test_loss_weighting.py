"""Exact token means across microbatches and ranks, checked without a Trainer.

Composer's arithmetic is written out here: each microbatch's loss is multiplied by
``u(microbatch) / mean over ranks of u(rank batch)`` and DDP averages the ranks.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from composer_remask._private_api import composer_microbatch_weight
from composer_remask.batch import DIVERGENCE_MASK_KEY
from composer_remask.remask.loss_weighting import (
    GlobalCounts,
    MicrobatchScales,
    WeightingProbe,
    declared_microbatch_weight,
    microbatch_scales,
)


def composer_step(per_rank_microbatches, unit):
    """Loss gradient weight every token gets from Composer's weighting + DDP, with our scales."""
    world = len(per_rank_microbatches)
    all_rows = [row for rank in per_rank_microbatches for mb in rank for row in mb]
    counts = GlobalCounts(samples=len(all_rows), ce_tokens=sum(r["ce"] for r in all_rows),
                          divergence_tokens=sum(r["div"] for r in all_rows), masked=0, maskable=0)
    mean_units = sum(unit(mb) for rank in per_rank_microbatches for mb in rank) / world
    ce_weight = div_weight = 0.0
    for rank in per_rank_microbatches:
        for mb in rank:
            c = unit(mb) / mean_units
            scales = microbatch_scales(counts, c, world)
            # Composer multiplies by c, DDP divides by the world size.
            ce_weight += c * scales.ce * sum(r["ce"] for r in mb) / world
            div_weight += c * scales.divergence * sum(r["div"] for r in mb) / world
    return ce_weight, div_weight


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("weighting", ["samples", "tokens", "odd_tokens"])
def test_every_token_counts_once_whatever_the_split_and_weighting(seed, weighting):
    rng = random.Random(seed)
    units = {"samples": lambda mb: len(mb), "tokens": lambda mb: sum(r["div"] for r in mb),
             # any additive count a DataSpec may use (padded tokens, post-drop labels, ...)
             "odd_tokens": lambda mb: sum(r["ce"] + 3 for r in mb)}
    world = rng.choice([1, 2, 3])
    ranks = []
    for _ in range(world):
        rows = [{"ce": rng.randint(0, 9), "div": rng.randint(1, 12)} for _ in range(rng.randint(1, 6))]
        size = rng.randint(1, len(rows))
        ranks.append([rows[i:i + size] for i in range(0, len(rows), size)])
    ce_weight, div_weight = composer_step(ranks, units[weighting])
    # Sum over tokens of (per-token weight) == 1: the loss is the global token mean.
    assert ce_weight == pytest.approx(1.0 if any(r["ce"] for rk in ranks for mb in rk for r in mb) else 0.0)
    assert div_weight == pytest.approx(1.0)


def test_a_microbatch_composer_gives_no_weight_gets_no_scale():
    counts = GlobalCounts(4, 10, 12, 0, 0)
    assert microbatch_scales(counts, 0.0, 2) == MicrobatchScales(ce=0.0, divergence=0.0, composer_weight=0.0)
    scales = microbatch_scales(GlobalCounts(4, 0, 0, 0, 0), 1.0, 1)
    assert (scales.ce, scales.divergence) == (0.0, 0.0)  # no token anywhere: a zero loss, not a NaN


def test_declared_weights_follow_composers_formula():
    mb = {"input_ids": torch.zeros(3, 5), DIVERGENCE_MASK_KEY: torch.tensor([[0, 1, 1, 0, 0]] * 3)}
    counts = GlobalCounts(samples=8, ce_tokens=10, divergence_tokens=12, masked=0, maskable=0)
    assert declared_microbatch_weight("samples", mb, counts, world_size=2) == pytest.approx(3 / 4)
    assert declared_microbatch_weight("tokens", mb, counts, world_size=2) == pytest.approx(6 / 6)
    with pytest.raises(ValueError, match="auto"):
        declared_microbatch_weight("auto", mb, counts, world_size=1)


def test_outside_a_trainer_the_weight_is_unknown():
    assert composer_microbatch_weight() is None


def test_probe_reads_the_weight_applied_in_place():
    probe = WeightingProbe()
    total = torch.tensor(2.0)
    probe.arm(total, expected_weight=0.5)
    assert probe.armed
    total.mul_(0.25)  # what Composer does before backward
    applied, expected = probe.applied_weight()
    assert (applied, expected) == (0.25, 0.5) and not WeightingProbe.matches(applied, expected)
    assert probe.confirmed and not probe.armed
    probe.arm(torch.tensor(1.0), 0.5)  # confirmed once: not armed again
    assert not probe.armed


def test_probe_measures_a_weight_of_one_too():
    """Regression: a measured 1.0 was taken for a grad scaler's copy, so a wrong declaration passed."""
    probe = WeightingProbe()
    probe.arm(torch.tensor(2.0), expected_weight=1.3)  # DDP, one microbatch per rank: Composer applies 1.0
    applied, expected = probe.applied_weight()
    assert applied == 1.0 and not WeightingProbe.matches(applied, expected)


def test_probe_stays_off_under_a_grad_scaler_and_learns_nothing_from_a_zero_loss():
    probe = WeightingProbe()
    probe.arm(torch.tensor(2.0), 0.5, scaled_copy=True)  # amp_fp16: Composer scales a copy
    assert not probe.armed
    probe.arm(torch.tensor(0.0), 0.5)
    assert probe.applied_weight() is None and not probe.confirmed


def test_counts_may_be_numpy_numbers_or_tensors():
    from composer_remask._private_api import _number

    assert _number(np.int64(3)) == 3.0 and _number(np.float32(1.5)) == 1.5
    assert _number(torch.tensor(7)) == 7.0 and _number(5) == 5.0
    assert _number(True) is None and _number(torch.ones(2)) is None and _number("3") is None


def test_gathering_leaves_the_local_counts_alone(monkeypatch):
    from composer.utils import dist

    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, reduce_operation: tensor.mul_(2))  # a 2-rank SUM
    local = torch.tensor([4.0, 10.0, 12.0, 3.0, 9.0], dtype=torch.float64)
    counts = GlobalCounts.gather(local)
    assert counts == GlobalCounts(8.0, 20.0, 24.0, 6.0, 18.0)
    assert local.tolist() == [4.0, 10.0, 12.0, 3.0, 9.0]  # regression: this rank's rows were overwritten
