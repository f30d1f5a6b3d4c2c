"""``remask_step_loss`` (ReMask as a function) gives what ReMask logs inside a Trainer."""

from __future__ import annotations

import pytest

from composer_remask import ReMask, remask_step_loss
from tests.helpers.synthetic import CoTDataset, collate
from tests.helpers.tolerances import ROUNDING_GROWTH, ce_floor
from tests.helpers.training import build_model, logged, run

ARGUMENTS = dict(mask_prob=0.5, weight=0.7, rationale_label_drop_prob=0.3, answer_only_prob=0.3)
EXTRAS = [{}, {"divergence": "js", "detach_full": True}, {"mask_prob": 0.0},
          {"weight": 0.0, "masked_only": True, "mask_strategy": "random"}]


# Every case on the shared-prefix layout (what ``auto`` picks on the tiny StableLM); the stacked layout on one
# two-pass case with microbatches (the two one-pass cases run no second pass in either layout). This
# parametrization overrides the ``forward_layout`` fixture (tests/remask/conftest.py), which would double all eight.
@pytest.mark.parametrize("microbatch,extra,forward_layout", [
    *(pytest.param(microbatch, extra, "shared_prefix", id=f"shared_prefix-extra{i}-{microbatch}")
      for i, extra in enumerate(EXTRAS) for microbatch in (4, 2)),
    pytest.param(2, EXTRAS[0], "stacked", id="stacked-extra0-2"),
])
def test_the_function_gives_what_the_algorithm_logs(tiny_tokenizer, microbatch, extra, forward_layout):
    arguments = {**ARGUMENTS, **extra}
    _, _, logger = run(tiny_tokenizer, [ReMask(seed=21, forward_layout=forward_layout, **arguments)],
                       microbatch=microbatch, n=4)
    model = build_model(tiny_tokenizer).model.train()
    batch = collate([CoTDataset(tiny_tokenizer, 4)[i] for i in range(4)])
    loss = remask_step_loss(model, batch, tokenizer=tiny_tokenizer, seed=21, batch_index=0,
                            forward_layout=forward_layout, **arguments)
    # Two float32 routes to the batch's losses (microbatches or not): within float32's rounding of
    # this batch's cross-entropy, measured in float64 (each value is at most a CE in size).
    tolerance = ROUNDING_GROWTH * ce_floor(tiny_tokenizer)
    for key, value in loss.items():
        assert logged(logger, f"loss/train/{key}")[0] == pytest.approx(value.item(), abs=tolerance), key
    assert set(loss) == {key.removeprefix("loss/train/") for key in logger.data if key.startswith("loss/train/")}
    loss["total"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_the_function_checks_its_arguments_as_remask_does(tiny_tokenizer):
    batch = collate([CoTDataset(tiny_tokenizer, 2)[i] for i in range(2)])
    model = build_model(tiny_tokenizer).model
    for arguments, match in (({"mask_prob": 1.5}, "mask_prob"), ({"divergence": "kl"}, "divergence"),
                             ({"mask_strategy": "zero"}, "mask_strategy"), ({"masked_only": True}, "weight=0")):
        with pytest.raises(ValueError, match=match):
            remask_step_loss(model, batch, tokenizer=tiny_tokenizer, **arguments)


def test_label_rules_left_unset_are_the_cards_where_batches_carry_roles(tiny_tokenizer):
    """``None`` (the default) is the card's 0.1 where ``token_roles`` exist, not "off"."""
    batch = collate([CoTDataset(tiny_tokenizer, 4)[i] for i in range(4)])
    model = build_model(tiny_tokenizer).model.train()
    default = remask_step_loss(model, batch, tokenizer=tiny_tokenizer, seed=5)
    card = remask_step_loss(model, batch, tokenizer=tiny_tokenizer, seed=5, rationale_label_drop_prob=0.1,
                            answer_only_prob=0.1)
    assert all(default[key].item() == card[key].item() for key in card)
    assert ReMask().options.label_rule_probs == (0.1, 0.1)
    assert "rationale_label_drop_prob=None" in repr(ReMask())
