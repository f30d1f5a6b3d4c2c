"""Every float option refuses NaN, infinities and out-of-range values, through one check.

``nan < 0`` is false: a range check written by hand lets NaN through, and the run then trains a
NaN model and exits 0. Each constructor a user calls from Python is covered here; recipes and
command lines are covered in ``tests/train/test_preflight.py`` and ``tests/data/test_data_faults.py``.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from composer_remask.checks import finite_number, non_finite_numbers
from composer_remask.data.dataset import build_dataloader
from composer_remask.data.writer import StreamWeight
from composer_remask.evaluate import main as remask_eval
from composer_remask.optim import Lilith, OneCycleCosineScheduler
from composer_remask.remask.algorithm import ReMask
from composer_remask.remask.loss import remask_loss
from composer_remask.remask.masking import MaskVocabulary, remask_batch

NON_FINITE = [math.nan, math.inf, -math.inf, "nan", "inf"]


@pytest.mark.parametrize("value", NON_FINITE + [True, None, "high"])
def test_non_numbers_and_non_finite_values_are_refused(value):
    with pytest.raises(ValueError, match=r"^opt: expected a finite number, got"):
        finite_number(value, "opt")


def test_bounds_open_and_closed():
    assert finite_number("0.5", "p", low=0, high=1) == 0.5
    assert finite_number(0, "p", low=0, high=1) == 0.0 and finite_number(1, "p", low=0, high=1) == 1.0
    with pytest.raises(ValueError, match=r"p: must be in \[0, 1\), got 1"):
        finite_number(1.0, "p", low=0, high=1, high_open=True)
    with pytest.raises(ValueError, match=r"p: must be > 0, got 0"):
        finite_number(0.0, "p", low=0, low_open=True)
    with pytest.raises(ValueError, match=r"p: must be >= 0, got -1"):
        finite_number(-1, "p", low=0)
    with pytest.raises(ValueError, match=r"p: must be <= 2, got 3"):
        finite_number(3, "p", high=2)


def test_non_finite_numbers_name_the_dotted_key():
    tree = {"a": 1.0, "b": {"c": [0.5, math.nan]}, "d": {"e": -math.inf}, "f": "nan"}
    assert [key for key, _ in non_finite_numbers(tree)] == ["b.c.1", "d.e"]


def _params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(2))]


IDS = torch.tensor([[5, 6, 7, 8]])
LOGITS = torch.zeros(1, 4, 10)
VOCABULARY = MaskVocabulary(strategy="mask_token", mask_token_id=9)
TOKENIZER = SimpleNamespace(pad_token_id=0, eos_token_id=0)


FLOAT_OPTIONS = {
    "ReMask.mask_prob": lambda v: ReMask(mask_prob=v),
    "ReMask.weight": lambda v: ReMask(weight=v),
    "ReMask.rationale_label_drop_prob": lambda v: ReMask(rationale_label_drop_prob=v),
    "ReMask.answer_only_prob": lambda v: ReMask(answer_only_prob=v),
    "ReMask.mask_prob_warmup": lambda v: ReMask(mask_prob_warmup=v),
    "Lilith.lr": lambda v: Lilith(_params(), lr=v),
    "Lilith.eps": lambda v: Lilith(_params(), lr=1e-3, eps=v),
    "Lilith.beta1_m": lambda v: Lilith(_params(), lr=1e-3, beta1_m=v),
    "Lilith.beta2_m": lambda v: Lilith(_params(), lr=1e-3, beta2_m=v),
    "Lilith.beta_v": lambda v: Lilith(_params(), lr=1e-3, beta_v=v),
    "Lilith.weight_decay": lambda v: Lilith(_params(), lr=1e-3, weight_decay=v),
    "Lilith.g_norm_min": lambda v: Lilith(_params(), lr=1e-3, g_norm_min=v),
    "Lilith.ratio_min": lambda v: Lilith(_params(), lr=1e-3, ratio_min=v),
    "Lilith.acceleration": lambda v: Lilith(_params(), lr=1e-3, acceleration=v),
    "Lilith.ema_beta": lambda v: Lilith(_params(), lr=1e-3, ema_k=2, ema_beta=v),
    "one_cycle_cosine.pct_start": lambda v: OneCycleCosineScheduler(pct_start=v),
    "one_cycle_cosine.div_factor": lambda v: OneCycleCosineScheduler(div_factor=v),
    "one_cycle_cosine.final_div_factor": lambda v: OneCycleCosineScheduler(final_div_factor=v),
    "remask_batch.mask_prob": lambda v: remask_batch(IDS, IDS, mask_prob=v, vocabulary=VOCABULARY),
    "remask_batch.rationale_label_drop_prob": lambda v: remask_batch(IDS, IDS, mask_prob=0.0,
                                                                     rationale_label_drop_prob=v),
    "remask_batch.answer_only_prob": lambda v: remask_batch(IDS, IDS, mask_prob=0.0, answer_only_prob=v),
    "remask_loss.weight": lambda v: remask_loss(LOGITS, LOGITS, IDS, weight=v),
    "loader.timeout": lambda v: build_dataloader({"local": "/nonexistent", "timeout": v}, TOKENIZER, 1)
    if not 0 <= v < 1 else None,  # a valid timeout would go on to open the (missing) corpus
    "loader.stream.download_timeout": lambda v: build_dataloader(
        {"streams": {"a": {"local": "/nonexistent", "download_timeout": v}}}, TOKENIZER, 1) if not 0 <= v < 1 else None,
    "StreamWeight.repeat": lambda v: StreamWeight("repeat", v),
    "StreamWeight.proportion": lambda v: StreamWeight("proportion", v),
}


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("option", sorted(FLOAT_OPTIONS))
def test_every_float_option_refuses_non_finite_values(option, value):
    with pytest.raises(ValueError, match="expected a finite number"):
        FLOAT_OPTIONS[option](value)


@pytest.mark.parametrize("option", sorted(FLOAT_OPTIONS))
def test_every_float_option_takes_a_plain_number(option):
    FLOAT_OPTIONS[option](0.5)


@pytest.mark.parametrize("value", ["nan", "inf", "-3", "0"])
def test_remask_eval_limit_is_a_usage_error(value, capsys):
    with pytest.raises(SystemExit) as stopped:
        remask_eval(["model-folder", "--limit", value])
    assert stopped.value.code == 2
    assert "argument --limit:" in capsys.readouterr().err


@pytest.mark.parametrize("ema_k", [math.nan, -1, 1.5, True])
def test_lilith_ema_period_is_a_whole_number(ema_k):
    with pytest.raises(ValueError, match="ema_k must be an integer >= 0"):
        Lilith(_params(), lr=1e-3, ema_k=ema_k)
