"""What is read off a running Trainer: the run length in batches and the model under DDP."""

from __future__ import annotations

import pytest
import torch
from composer.core import State
from composer.devices import DeviceCPU

from composer_remask.runtime import run_length_in_batches, unwrap_ddp


def make_state(max_duration: str | None, dataloader_len: int | None = None) -> State:
    state = State(model=torch.nn.Linear(2, 2), rank_zero_seed=0, run_name="runtime-test", device=DeviceCPU(),
                  max_duration=max_duration)
    if dataloader_len is not None:
        state.set_dataloader(torch.utils.data.DataLoader(list(range(dataloader_len)), batch_size=1), "train")
    return state


@pytest.mark.parametrize(("max_duration", "dataloader_len", "expected"), [
    ("12ba", None, 12),
    ("12ba", 5, 12),
    ("3ep", 5, 15),
    ("3ep", None, None),  # epochs of an unknown length
    ("100sp", 5, None),  # samples and tokens are not a number of batches
    ("1000tok", 5, None),
    (None, 5, None),
])
def test_run_length_in_batches(max_duration, dataloader_len, expected):
    assert run_length_in_batches(make_state(max_duration, dataloader_len)) == expected


class Wrapper(torch.nn.parallel.DistributedDataParallel):
    """A DDP subclass built without a process group: only ``module`` matters here."""

    def __init__(self, module: torch.nn.Module) -> None:  # DDP.__init__ would need a process group
        torch.nn.Module.__init__(self)
        self.module = module


def test_unwrap_ddp_reaches_the_model_through_any_number_of_wrappers():
    model = torch.nn.Linear(2, 2)
    assert unwrap_ddp(model) is model
    assert unwrap_ddp(Wrapper(Wrapper(model))) is model
