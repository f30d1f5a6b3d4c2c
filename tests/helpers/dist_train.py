"""Train the tiny model with ReMask on a fixed global batch of 4, with 1 or 2 processes.

Run from the repository root as ``PYTHONPATH=. composer -n 2 tests/helpers/dist_train.py OUT`` or
``PYTHONPATH=. python tests/helpers/dist_train.py OUT`` (it imports ``tests.helpers``);
``--forward-layout LAYOUT`` sets ``ReMask(forward_layout=...)`` (default ``auto``).
With one process the samples come in their natural order; with two, DistributedSampler interleaves
them (rank r holds samples r, r+2, ...). Both runs see the same global batches, laid out differently:
masks keyed on content make them train identically. Rank 0 saves weights and losses to OUT. An optional second argument ``float64`` trains the model in
float64 (one process): the reference that measures the float32 runs' rounding (``tests.helpers.tolerances``).
"""

from __future__ import annotations

import argparse

import torch
from composer import Trainer
from composer.loggers import InMemoryLogger
from composer.utils import dist
from torch.utils.data import DataLoader

from composer_remask import ReMask
from composer_remask.data.tokenizer import train_tiny_tokenizer
from tests.helpers.synthetic import CoTDataset, collate
from tests.helpers.tiny_model import TINY_TEXT
from tests.helpers.training import build_model

GLOBAL_BATCH = 4


def main(out: str, dtype: torch.dtype = torch.float32, forward_layout: str = "auto") -> None:
    tokenizer = train_tiny_tokenizer(TINY_TEXT, 400)
    data = CoTDataset(tokenizer, 12)
    world = dist.get_world_size()
    sampler = None if world == 1 else dist.get_sampler(data, shuffle=False)  # interleaved across ranks
    loader = DataLoader(data, batch_size=GLOBAL_BATCH // world, sampler=sampler, collate_fn=collate)
    model = build_model(tokenizer, seed=0).to(dtype)
    logger = InMemoryLogger()
    trainer = Trainer(model=model, train_dataloader=loader, max_duration="3ba", device="cpu",
                      optimizers=torch.optim.SGD(model.parameters(), lr=0.5), device_train_microbatch_size=1,
                      algorithms=[ReMask(mask_prob=0.4, weight=0.5, seed=5, forward_layout=forward_layout)],
                      loggers=[logger], seed=5, progress_bar=False)
    trainer.fit()
    if dist.get_global_rank() == 0:
        torch.save({"weights": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "losses": [float(v) for _, v in logger.data["loss/train/total"]],
                    "world": world}, out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("dtype", nargs="?", choices=("float32", "float64"), default="float32")
    parser.add_argument("--forward-layout", default="auto")
    args = parser.parse_args()
    main(args.out, getattr(torch, args.dtype), args.forward_layout)
