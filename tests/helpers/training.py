"""ReMask runs inside composer.Trainer on the synthetic CoT batches, and what to read back from them."""

from __future__ import annotations

import torch
from composer import Trainer
from composer.core import DataSpec
from composer.loggers import InMemoryLogger
from composer.metrics.nlp import LanguageCrossEntropy
from composer.models import HuggingFaceModel
from torch.utils.data import DataLoader
from transformers import StableLmForCausalLM

from composer_remask.batch import batch_loss_tokens
from tests.helpers.synthetic import CoTDataset, collate
from tests.helpers.tiny_model import tiny_stablelm_config


def build_model(tokenizer, seed=0, metrics=True, vocab_size=None):
    torch.manual_seed(seed)
    hf = StableLmForCausalLM(tiny_stablelm_config(vocab_size or len(tokenizer)))
    return HuggingFaceModel(hf, tokenizer=tokenizer, use_logits=True,
                            metrics=[LanguageCrossEntropy()] if metrics else None)


def token_data_spec(loader):
    """A DataSpec that reports loss-generating tokens, as composer_remask's loaders do."""
    return DataSpec(loader, get_num_tokens_in_batch=lambda b: {
        "total": int(b["attention_mask"].sum()), "loss_generating": batch_loss_tokens(b)})


def run(tokenizer, algorithms, *, microbatch=4, batch=4, n=8, duration="1ba", seed=0, metrics=True,
        on_tokens=False, token_spec=False, dataset=None, lr=0.5, dtype=None, **trainer_kwargs):
    model = build_model(tokenizer, seed, metrics)
    if dtype is not None:  # float64: the reference that measures a float32 run's rounding (tests.helpers.tolerances)
        model = model.to(dtype)
    loader = DataLoader(dataset if dataset is not None else CoTDataset(tokenizer, n), batch_size=batch,
                        collate_fn=collate)
    logger = InMemoryLogger()
    trainer = Trainer(
        model=model, train_dataloader=token_data_spec(loader) if token_spec else loader,
        optimizers=torch.optim.SGD(model.parameters(), lr=lr), max_duration=duration, algorithms=algorithms,
        loggers=[logger], device="cpu", device_train_microbatch_size=microbatch, progress_bar=False,
        seed=seed, accumulate_train_batch_on_tokens=on_tokens, **trainer_kwargs)
    trainer.fit()
    return trainer, model, logger


def logged(logger, key):
    return [float(v) for _, v in logger.data[key]]


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_weight_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)
