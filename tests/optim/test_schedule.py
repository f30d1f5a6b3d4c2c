"""One Cycle cosine against hand-worked values and against PyTorch's OneCycleLR."""

from __future__ import annotations

import math

import pytest
import torch
from composer.core import State, Timestamp
from composer.devices import DeviceCPU

from composer_remask.optim import OneCycleCosineScheduler


def make_state(max_duration: str, dataloader_len: int | None = None) -> State:
    model = torch.nn.Linear(2, 2)
    state = State(model=model, rank_zero_seed=0, run_name="schedule-test", device=DeviceCPU(),
                  max_duration=max_duration)
    if dataloader_len is not None:
        loader = torch.utils.data.DataLoader(list(range(dataloader_len)), batch_size=1)
        state.set_dataloader(loader, "train")
    return state


def at_batch(state: State, batch: int) -> State:
    state.timestamp = Timestamp(batch=batch)
    return state


def test_hand_worked_values():
    # 10 batches, pct_start 0.3: warm-up ends at step 0.3*10-1 = 2, the decay ends at step 9.
    # start = 1/25 = 0.04, end = 0.04/1e4 = 4e-6.
    schedule = OneCycleCosineScheduler(pct_start=0.3, div_factor=25, final_div_factor=1e4)
    state = make_state("10ba")
    assert schedule(at_batch(state, 0)) == pytest.approx(0.04)
    assert schedule(at_batch(state, 1)) == pytest.approx(0.52)  # 1 + (0.04-1)/2 (cos(pi/2)+1)
    assert schedule(at_batch(state, 2)) == pytest.approx(1.0)
    # step 4: fraction (4-2)/(9-2) = 2/7 of the way down
    assert schedule(at_batch(state, 4)) == pytest.approx(4e-6 + (1 - 4e-6) / 2 * (math.cos(2 * math.pi / 7) + 1))
    assert schedule(at_batch(state, 9)) == pytest.approx(4e-6)
    assert schedule(at_batch(state, 12)) == pytest.approx(4e-6)  # past the end: stays at the floor


def test_epochs_use_batches_per_epoch():
    schedule = OneCycleCosineScheduler(pct_start=0.25)
    by_epochs = make_state("2ep", dataloader_len=10)  # 20 batches
    by_batches = make_state("20ba")
    for batch in range(20):
        assert schedule(at_batch(by_epochs, batch)) == schedule(at_batch(by_batches, batch))


@pytest.mark.parametrize("total,pct_start,div,final_div", [(50, 0.3, 25.0, 1e4), (37, 0.1, 10.0, 100.0)])
def test_matches_pytorch_one_cycle(total, pct_start, div, final_div):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2e-5)
    reference = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=2e-5, total_steps=total, pct_start=pct_start, anneal_strategy="cos",
        div_factor=div, final_div_factor=final_div, cycle_momentum=False, three_phase=False)
    schedule = OneCycleCosineScheduler(pct_start=pct_start, div_factor=div, final_div_factor=final_div)
    state = make_state(f"{total}ba")
    for step in range(total):
        assert 2e-5 * schedule(at_batch(state, step)) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-9)
        optimizer.step()
        reference.step()


def test_rejects_durations_it_cannot_count_in_batches():
    state = make_state("100tok")
    with pytest.raises(ValueError, match="batches"):
        OneCycleCosineScheduler()(at_batch(state, 0))


def test_scale_schedule_ratio_stretches_the_run():
    schedule = OneCycleCosineScheduler(pct_start=0.3)
    assert schedule(at_batch(make_state("20ba"), 5), ssr=0.5) == schedule(at_batch(make_state("10ba"), 5))
