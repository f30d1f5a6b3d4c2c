"""ReMask next to Composer's own algorithms, callbacks and trainer features: exact, in any list order.

Exact means: the same weights whichever order the list has, the loss equal to an independent
computation on the batch the model really sees, and no trace left on the model afterwards.
"""

from __future__ import annotations

import pytest
import torch
from composer import Trainer
from composer.algorithms import EMA, SAM, SWA, GradientClipping, SeqLengthWarmup
from composer.callbacks import LRMonitor, OptimizerMonitor, SpeedMonitor
from composer.core import Algorithm, Event
from composer.loggers import InMemoryLogger
from composer.models import HuggingFaceModel
from torch.utils.data import DataLoader

from composer_remask import ReMask
from composer_remask.batch import forward_passes
from tests.helpers.synthetic import CoTDataset, collate
from tests.helpers.tolerances import ROUNDING_GROWTH, hf_ce_floor, run_floor
from tests.helpers.training import build_model, logged, max_weight_diff, run, weights

NO_LABEL_RULES = dict(rationale_label_drop_prob=0.0, answer_only_prob=0.0)


def first_batch(tokenizer, n=4):
    return collate([CoTDataset(tokenizer, n)[i] for i in range(n)])


def hf_loss(model, batch):
    with torch.no_grad():
        return model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           labels=batch["labels"]).loss.item()


def both_orders(tokenizer, make_other, remask_kwargs, **run_kwargs):
    """Train with [other, ReMask] and [ReMask, other]; return {order: (weights, logger)}."""
    out = {}
    for order in ("other_first", "remask_first"):
        other, remask = make_other(), ReMask(**remask_kwargs)
        algorithms = [other, remask] if order == "other_first" else [remask, other]
        _, model, logger = run(tokenizer, algorithms, **run_kwargs)
        out[order] = (weights(model), logger)
    return out


# ------------------------------------------------------------------------- batch-editing algorithms


@pytest.mark.parametrize("truncate", [True, False])
def test_seq_length_warmup_is_exact_in_both_orders(tiny_tokenizer, truncate, forward_layout):
    """Regression: with ReMask appended, ce_full was 0.44x the loss of the truncated batch."""
    def warmup():
        return SeqLengthWarmup(duration=1.0, min_seq_length=8, max_seq_length=16, step_size=8, truncate=truncate)

    out = both_orders(tiny_tokenizer, warmup, dict(seed=4, forward_layout=forward_layout, **NO_LABEL_RULES), microbatch=2,
                      duration="2ba", n=8)
    # What the model saw on batch 1: the batch cut (or reshaped) to 8 tokens by SeqLengthWarmup itself.
    from composer.algorithms.seq_length_warmup import set_batch_sequence_length

    seen = set_batch_sequence_length(dict(first_batch(tiny_tokenizer)), 8, truncate=truncate)
    expected, floor = hf_loss(build_model(tiny_tokenizer), seen), hf_ce_floor(build_model(tiny_tokenizer), seen)
    for order, (_, logger) in out.items():
        got = logged(logger, "loss/train/ce_full")[0]
        print(f"[truncate={truncate}, {order}, {forward_layout}] ce_full {got:.6f}, HF loss of the batch the model saw {expected:.6f}"
              f" (float32 rounding of that loss {floor:.2e})")
        assert got == pytest.approx(expected, abs=ROUNDING_GROWTH * floor)  # two float32 routes to one CE
    # Bit-exact: the list order changes when each algorithm runs, not the arithmetic (same kernels, same shapes).
    assert max_weight_diff(out["other_first"][0], out["remask_first"][0]) == 0.0


class TruncateMicrobatch(Algorithm):
    """Edits each microbatch at BEFORE_FORWARD, after ReMask prepared the batch."""

    def match(self, event, state):
        return event == Event.BEFORE_FORWARD

    def apply(self, event, state, logger):
        state.batch = {k: v[:, :8] if torch.is_tensor(v) and v.dim() == 2 and k != "remask_row_counts" else v
                       for k, v in state.batch.items()}


class DropRows(Algorithm):
    """Drops a row of the whole batch at BATCH_START, after ReMask counted it."""

    def match(self, event, state):
        return event == Event.BATCH_START

    def apply(self, event, state, logger):
        state.batch = {k: v[1:] if torch.is_tensor(v) else v for k, v in state.batch.items()}


class FlipTokens(Algorithm):
    """Edits token ids in place at BEFORE_FORWARD (same shapes)."""

    def match(self, event, state):
        return event == Event.BEFORE_FORWARD

    def apply(self, event, state, logger):
        state.batch["input_ids"][:, 1].add_(1)


@pytest.mark.parametrize("editor,first,match", [
    (TruncateMicrobatch, True, "microbatch changed after ReMask prepared"),  # before ReMask's BEFORE_FORWARD
    (TruncateMicrobatch, False, "model's input was changed after ReMask built it"),  # after it
    (FlipTokens, False, "model's input was changed after ReMask built it"),
    (DropRows, False, "trained 3 rows of a batch ReMask prepared with 4"),
], ids=["truncate_before", "truncate_after", "flip_after", "drop_rows"])
def test_a_later_batch_edit_is_an_error_naming_the_cause(tiny_tokenizer, editor, first, match):
    """Regression: the error used to be the loss-weighting one (or an IndexError, or nothing at all)."""
    algorithms = [editor(), ReMask()] if first else [ReMask(), editor()]
    with pytest.raises(RuntimeError, match=match) as error:
        run(tiny_tokenizer, algorithms, microbatch=2)
    assert "loss_weighting" not in str(error.value)
    assert "AFTER_DATALOADER" in str(error.value)


# ----------------------------------------------------------------------- algorithms around the step


@pytest.mark.parametrize("make_other", [
    lambda: GradientClipping(clipping_type="norm", clipping_threshold=0.05),
    lambda: EMA(half_life="1ba"),
    lambda: SAM(rho=0.05, interval=1),
], ids=["gradient_clipping", "ema", "sam"])
def test_step_algorithms_are_exact_in_both_orders(tiny_tokenizer, make_other, forward_layout):
    out = both_orders(tiny_tokenizer, make_other, dict(seed=6, forward_layout=forward_layout), microbatch=2,
                      duration="3ba", n=12)
    alone = run(tiny_tokenizer, [ReMask(seed=6, forward_layout=forward_layout)], microbatch=2, duration="3ba", n=12)[2]
    assert max_weight_diff(out["other_first"][0], out["remask_first"][0]) == 0.0
    for _, logger in out.values():  # the first step's loss does not depend on what comes after it:
        # bit-exact, the same forward on the same batch and weights as ReMask alone.
        assert logged(logger, "loss/train/total")[0] == logged(alone, "loss/train/total")[0]


def test_gradient_clipping_clips_the_remask_gradient(tiny_tokenizer, forward_layout):
    """One step of ReMask + clipping equals ReMask's own gradient, clipped by hand."""
    lr, threshold = 0.5, 0.05
    remask = dict(seed=2, forward_layout=forward_layout)
    _, clipped, _ = run(tiny_tokenizer, [ReMask(**remask), GradientClipping("norm", threshold)], microbatch=2, lr=lr)
    start = {k: w.double() for k, w in weights(build_model(tiny_tokenizer)).items()}
    _, plain, _ = run(tiny_tokenizer, [ReMask(**remask)], microbatch=2, lr=lr)
    step = {k: (start[k] - w.double()) / lr for k, w in weights(plain).items()}  # the gradient ReMask computed
    params = dict(plain.named_parameters())
    norm = torch.sqrt(sum((step[k] ** 2).sum() for k in step if k in params)).item()
    assert norm > threshold
    factor = threshold / (norm + 1e-6)  # torch's clip_grad_norm_ formula (its 1e-6 guards a zero norm)
    expected = {k: start[k] - lr * step[k] * factor for k in step}
    # The hand computation is float64; the clipped and plain runs each round as float32 does, measured in float64.
    floor = run_floor(weights(plain), tiny_tokenizer, [ReMask(**remask)], microbatch=2, lr=lr)
    print(f"[{forward_layout}] clipped vs by hand: {max_weight_diff(weights(clipped), expected):.2e} (floor {floor:.2e}); "
          f"unclipped vs by hand: {max_weight_diff(weights(plain), expected):.2e}")
    assert max_weight_diff(weights(clipped), expected) <= ROUNDING_GROWTH * floor


@pytest.mark.slow
def test_swa_is_exact_in_both_orders(tiny_tokenizer, forward_layout):
    out = both_orders(tiny_tokenizer, lambda: SWA(swa_start="1ep", swa_end="2ep", update_interval="1ep"),
                      dict(seed=8, forward_layout=forward_layout), microbatch=2, duration="3ep", n=8)
    assert max_weight_diff(out["other_first"][0], out["remask_first"][0]) == 0.0


def test_callbacks_and_eval_during_fit_change_nothing(tiny_tokenizer):
    eval_loader = DataLoader(CoTDataset(tiny_tokenizer, 4, seed=1), batch_size=4, collate_fn=collate)
    _, plain, plain_log = run(tiny_tokenizer, [ReMask(seed=3)], microbatch=2, duration="3ba", n=12)
    _, busy, busy_log = run(tiny_tokenizer, [ReMask(seed=3)], microbatch=2, duration="3ba", n=12,
                            callbacks=[SpeedMonitor(window_size=1), LRMonitor(), OptimizerMonitor()],
                            eval_dataloader=eval_loader, eval_interval="1ba")
    assert logged(busy_log, "loss/train/total") == logged(plain_log, "loss/train/total")
    assert max_weight_diff(weights(busy), weights(plain)) == 0.0
    assert len(logged(busy_log, "metrics/eval/LanguageCrossEntropy")) >= 3


def test_fit_twice_continues_like_one_fit(tiny_tokenizer):
    _, once, once_log = run(tiny_tokenizer, [ReMask(seed=5)], microbatch=2, duration="4ba", n=16)
    model = build_model(tiny_tokenizer)
    logger = InMemoryLogger()
    loader = DataLoader(CoTDataset(tiny_tokenizer, 16), batch_size=4, collate_fn=collate)
    trainer = Trainer(model=model, train_dataloader=loader, optimizers=torch.optim.SGD(model.parameters(), lr=0.5),
                      max_duration="2ba", algorithms=[ReMask(seed=5)], loggers=[logger], device="cpu",
                      device_train_microbatch_size=2, progress_bar=False, seed=0)
    trainer.fit()
    trainer.fit(duration="2ba")
    assert logged(logger, "loss/train/total") == logged(once_log, "loss/train/total")
    assert max_weight_diff(weights(model), weights(once)) == 0.0


# --------------------------------------------------------------------------------- no lasting trace


class FlopsModel(HuggingFaceModel):
    """A user's model with its own one-pass FLOP count (not composer_remask's)."""

    def flops_per_batch(self, batch):
        return float(batch["input_ids"].numel())


class RecordFlops(Algorithm):
    def __init__(self):
        self.seen = []

    def match(self, event, state):
        return event == Event.BATCH_END

    def apply(self, event, state, logger):
        self.seen.append(state.model.flops_per_batch(state.batch) / state.batch["input_ids"].numel())
        self.batch = dict(state.batch)


def _suffix_share(batch) -> float:
    """Positions the masked suffixes add in the shared-prefix layout (from each row's first masked token to its
    last real one), as a share of the batch's positions."""
    added = 0
    for full, masked, attended in zip(batch["input_ids"], batch["remask_masked_input_ids"], batch["attention_mask"]):
        real = attended.nonzero().flatten()
        differs = ((full != masked) & attended.bool()).nonzero().flatten()
        if len(differs):
            added += int(real[-1]) + 1 - int(differs[0])
    return added / batch["input_ids"].numel()


def _with_position_ids(samples):
    """A collator that also hands the model position ids (a per-row input the shared prefix cannot rebuild)."""
    batch = collate(samples)
    batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"]).clone()
    return batch


def _flops_fit(model, tokenizer, algorithms, collate_fn=collate):
    recorder = RecordFlops()
    loader = DataLoader(CoTDataset(tokenizer, 4), batch_size=4, collate_fn=collate_fn)
    Trainer(model=model, train_dataloader=loader, max_duration="1ba", algorithms=[*algorithms, recorder],
            device="cpu", progress_bar=False, optimizers=torch.optim.SGD(model.parameters(), lr=0.1)).fit()
    _flops_fit.last_batch = getattr(recorder, "batch", None)
    return recorder.seen


def test_flops_count_both_passes_only_while_remask_trains(tiny_tokenizer):
    """Regression: ReMask's doubled flops_per_batch outlived its Trainer (2x MFU in a later SFT phase)."""
    torch.manual_seed(0)
    from transformers import StableLmForCausalLM

    from tests.helpers.tiny_model import tiny_stablelm_config

    model = FlopsModel(StableLmForCausalLM(tiny_stablelm_config(len(tiny_tokenizer))), tokenizer=tiny_tokenizer,
                       use_logits=True)
    stacked = dict(forward_layout="stacked")  # [full; masked]: two whole passes
    assert _flops_fit(model, tiny_tokenizer, [ReMask(**stacked)]) == [2.0]
    assert "flops_per_batch" not in vars(model)
    with pytest.raises(RuntimeError):  # a fit that raises never reaches FIT_END
        _flops_fit(model, tiny_tokenizer, [ReMask(**stacked), DropRows()])
    assert _flops_fit(model, tiny_tokenizer, [ReMask(**stacked)]) == [2.0]  # not 4: the leftover is not wrapped again
    assert "flops_per_batch" not in vars(model)
    # Shared prefixes (the default where the model takes them): the full rows and the masked suffixes.
    (shared,) = _flops_fit(model, tiny_tokenizer, [ReMask()])
    share = _suffix_share(_flops_fit.last_batch)
    assert 0.0 < share < 1.0 and shared == pytest.approx(1.0 + share, rel=1e-12)
    assert "flops_per_batch" not in vars(model)
    # Regression: a batch that `auto` runs stacked (per-row inputs the layout cannot rebuild) was counted
    # at the shared-prefix cost.
    assert _flops_fit(model, tiny_tokenizer, [ReMask()], collate_fn=_with_position_ids) == [2.0]
    assert _flops_fit(model, tiny_tokenizer, []) == [1.0]
    assert _flops_fit(model, tiny_tokenizer, [ReMask(mask_prob=0.0)]) == [1.0]


def test_projects_model_counts_what_the_layout_runs(tiny_tokenizer):
    """Regression: the project's own model counted two whole passes while the shared-prefix layout ran
    the full rows plus the masked suffixes (MFU overstated by up to 2 / 1.4)."""
    from transformers import StableLmForCausalLM

    from composer_remask.train.model import ComposerCausalLM
    from tests.helpers.tiny_model import tiny_stablelm_config

    model = ComposerCausalLM(StableLmForCausalLM(tiny_stablelm_config(len(tiny_tokenizer))), tiny_tokenizer)
    (one_pass,) = _flops_fit(model, tiny_tokenizer, [])
    assert _flops_fit(model, tiny_tokenizer, [ReMask(forward_layout="stacked")]) == pytest.approx([2 * one_pass])
    (shared,) = _flops_fit(model, tiny_tokenizer, [ReMask()])
    share = _suffix_share(_flops_fit.last_batch)
    assert 0.0 < share < 1.0 and shared == pytest.approx((1.0 + share) * one_pass, rel=1e-12)
    batch = first_batch(tiny_tokenizer)
    assert forward_passes(batch) == 1 and "flops_per_batch" not in vars(model)


def test_seed_comes_from_the_restored_trainer_seed_when_the_checkpoint_has_no_remask_state(tiny_tokenizer,
                                                                                          tmp_path):
    run(tiny_tokenizer, [], microbatch=2, duration="2ba", n=16, seed=7, save_folder=str(tmp_path),
        save_interval="2ba")
    checkpoint = str(tmp_path / "ep0-ba2-rank0.pt")
    resumed = {}
    for name, algo in (("default", ReMask()), ("seed7", ReMask(seed=7)), ("seed99", ReMask(seed=99))):
        resumed[name] = logged(run(tiny_tokenizer, [algo], microbatch=2, duration="4ba", n=16, seed=99,
                                   load_path=checkpoint)[2], "loss/train/total")
    assert resumed["default"] == resumed["seed7"]
    assert resumed["default"] != resumed["seed99"]  # the test can tell the seeds apart


def _padded_collate(examples, width=40):
    """Rows padded to an even fixed width: Alibi's sequence scaling halves it."""
    fill = {"labels": -100, "token_roles": -1}
    return {k: torch.nn.functional.pad(v, (0, width - v.shape[1]), value=fill.get(k, 0))
            for k, v in collate(examples).items()}


def test_alibi_reshaping_gpt2_is_exact_in_both_orders(tiny_tokenizer):
    from composer.algorithms import Alibi
    from composer.algorithms.alibi import apply_alibi
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2():
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=len(tiny_tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return HuggingFaceModel(GPT2LMHeadModel(config), tokenizer=tiny_tokenizer, use_logits=True)

    out = {}
    for order in ("alibi_first", "remask_first"):
        model, logger = gpt2(), InMemoryLogger()
        # Stacked only: GPT-2 is not a shared-prefix model type, so ReMask's auto layout runs [full; masked] here.
        algorithms = [Alibi(max_sequence_length=128, train_sequence_length_scaling=0.5), ReMask(seed=1, **NO_LABEL_RULES)]
        loader = DataLoader(CoTDataset(tiny_tokenizer, 8), batch_size=4, collate_fn=_padded_collate)
        Trainer(model=model, train_dataloader=loader, max_duration="2ba", device="cpu", seed=0, loggers=[logger],
                algorithms=algorithms if order == "alibi_first" else algorithms[::-1], progress_bar=False,
                device_train_microbatch_size=2, optimizers=torch.optim.SGD(model.parameters(), lr=0.1)).fit()
        out[order] = (weights(model), logger)
    assert max_weight_diff(out["alibi_first"][0], out["remask_first"][0]) == 0.0
    reference = gpt2()
    apply_alibi(reference.model, max_sequence_length=128)
    batch = _padded_collate([CoTDataset(tiny_tokenizer, 8)[i] for i in range(4)])
    seen = {k: v.reshape(8, 20) for k, v in batch.items()}  # what Alibi's scaling feeds the model
    floor = hf_ce_floor(reference, seen)  # the float32 rounding of this CE, measured in float64
    for _, logger in out.values():
        assert logged(logger, "loss/train/ce_full")[0] == pytest.approx(hf_loss(reference, seen), abs=ROUNDING_GROWTH * floor)
