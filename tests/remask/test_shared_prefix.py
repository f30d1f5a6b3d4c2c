"""The shared-prefix layout gives the stacked ``[full; masked]`` layout's loss terms and gradients,
on every model family it runs on, and the stacked layout runs wherever it cannot.

Tolerance: both layouts compute the same numbers by different float32 routes (another attention
mask, other sequence lengths), so they may differ by float32 rounding and nothing else. That
rounding is measured in each case: the stacked layout in float32 against the same in float64
(``measured_floor``), and the layouts are allowed ``ROUNDING_GROWTH`` times it.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    StableLmForCausalLM,
)

from composer_remask import ReMask, remask_step_loss
from composer_remask.remask.shared_prefix import model_problem, shared_prefix_inputs
from tests.helpers.synthetic import CoTDataset, collate
from tests.helpers.tiny_model import tiny_stablelm_config
from tests.helpers.tolerances import ROUNDING_GROWTH, ce_floor, measured_floor
from tests.helpers.training import build_model, logged, max_weight_diff, run, weights

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=256, use_cache=False, tie_word_embeddings=False)


def _family(name: str, vocab: int, attention: str) -> torch.nn.Module:
    """A tiny model of each family the layout runs on (random weights, seeded)."""
    torch.manual_seed(0)
    if name == "stablelm":
        return StableLmForCausalLM(tiny_stablelm_config(vocab, attn_implementation=attention))
    if name == "gpt_neox":
        return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=vocab, rotary_pct=0.5, attn_implementation=attention,
                                                **SMALL))
    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM),
                                 "mistral": (MistralConfig, MistralForCausalLM),
                                 "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[name]
    extra = {"sliding_window": None} if name == "mistral" else {}
    return model_class(config_class(vocab_size=vocab, num_key_value_heads=2, attn_implementation=attention,
                                    **SMALL, **extra))


def _step(model, batch, tokenizer, layout: str):
    """One ReMask step's loss terms and parameter gradients under ``layout``."""
    model.zero_grad(set_to_none=True)
    loss = remask_step_loss(model, batch, tokenizer=tokenizer, seed=3, forward_layout=layout, mask_prob=0.4,
                            weight=0.5)
    loss["total"].backward()
    terms = torch.stack([loss[k].detach().double() for k in ("total", "ce_full", "ce_masked", "divergence")])
    grads = torch.cat([p.grad.detach().double().flatten() for p in model.parameters()])
    return terms, grads


def _batch(tokenizer, rows: int = 6):
    return collate([CoTDataset(tokenizer, rows, seed=2)[i] for i in range(rows)])


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["stablelm", "llama", "mistral", "qwen2", "gpt_neox"])
def test_both_layouts_give_the_same_loss_and_gradients(tiny_tokenizer, family, attention):
    model = _family(family, len(tiny_tokenizer), attention).train()
    assert model_problem(model) is None, family
    batch = _batch(tiny_tokenizer)
    shared = _step(model, batch, tiny_tokenizer, "shared_prefix")
    stacked = _step(model, batch, tiny_tokenizer, "stacked")
    stacked64 = _step(copy.deepcopy(model).double(), batch, tiny_tokenizer, "stacked")
    for i, what in enumerate(("loss terms", "gradients")):
        floor = measured_floor(stacked[i], stacked64[i])
        diff = float((shared[i] - stacked[i]).abs().max())
        print(f"[{family}, {attention}] {what}: |shared - stacked| {diff:.2e}, float32 rounding {floor:.2e}")
        assert diff <= ROUNDING_GROWTH * floor, what


@pytest.mark.parametrize("precision", ["autocast", "bf16_weights"])
@pytest.mark.parametrize("family", ["stablelm", "llama"])
def test_both_layouts_agree_in_bfloat16(tiny_tokenizer, family, precision):
    """The GPU recipes train in bf16 (autocast, or bf16 parameters under FSDP's pure mixed precision):
    the layouts' additive mask then meets bf16 scores. Both layouts must still agree, within the bf16
    rounding of the same step (the stacked step in bf16 against it in float32), and stay finite."""
    model = _family(family, len(tiny_tokenizer), "sdpa").train()
    batch = _batch(tiny_tokenizer)
    stacked32 = _step(model, batch, tiny_tokenizer, "stacked")
    if precision == "bf16_weights":
        model = copy.deepcopy(model).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast"):
        shared = _step(model, batch, tiny_tokenizer, "shared_prefix")
        stacked = _step(model, batch, tiny_tokenizer, "stacked")
    for i, what in enumerate(("loss terms", "gradients")):
        assert torch.isfinite(shared[i]).all(), what
        floor = float((stacked[i] - stacked32[i]).abs().max())
        diff = float((shared[i] - stacked[i]).abs().max())
        print(f"[{family}, {precision}] {what}: |shared - stacked| {diff:.2e}, bf16 rounding {floor:.2e}")
        assert floor > 0 and diff <= ROUNDING_GROWTH * floor, what


def test_the_prefix_is_the_full_rows_own_and_rows_without_a_mask_add_nothing():
    ids = torch.tensor([[5, 6, 7, 8, 9, 0], [5, 6, 7, 8, 0, 0], [5, 6, 7, 8, 9, 10]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    masked = ids.clone()
    masked[0, 3] = 99  # row 0: masked from position 3 on, so it appends positions 3 and 4
    masked[2, 5] = 99  # row 2: the last token only
    inputs, rows = shared_prefix_inputs({"input_ids": ids, "attention_mask": attention}, masked, attention.bool(),
                                        torch.float32)
    # Segments: row 0 is 5 real + 2 suffix, row 1 is 4 real (no mask: nothing appended), row 2 is 6 + 1.
    assert rows.suffix_tokens == 3 and rows.seq_len == 7 and rows.rows == 3
    assert inputs["input_ids"][0].tolist() == [5, 6, 7, 8, 9, 99, 9]
    assert inputs["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 3, 4]
    assert rows.full_index[0, :5].tolist() == [0, 1, 2, 3, 4]
    assert rows.masked_index[0, :5].tolist() == [0, 1, 2, 5, 6]  # the prefix is the full row's own output
    assert rows.masked_index[1, :4].tolist() == rows.full_index[1, :4].tolist()
    allowed = inputs["attention_mask"][0, 0] == 0
    # The first suffix position (masked position 3) sees the unmasked prefix 0..2 and itself, not the
    # full row's own positions 3 and 4, which masking replaced.
    assert allowed[5].nonzero().flatten().tolist() == [0, 1, 2, 5]
    assert allowed[6].nonzero().flatten().tolist() == [0, 1, 2, 5, 6]
    assert allowed[4].nonzero().flatten().tolist() == [0, 1, 2, 3, 4]  # the full row: causal as ever


def test_short_segments_share_a_forward_row_without_seeing_each_other():
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 0, 0, 0], [14, 15, 16, 17, 0, 0]])
    attention = (ids != 0).long()
    masked = ids.clone()
    masked[0, 2] = 99  # row 0: 6 real + 4 suffix = 10, the longest segment
    inputs, rows = shared_prefix_inputs({"input_ids": ids, "attention_mask": attention}, masked, attention.bool(),
                                        torch.float32)
    assert rows.seq_len == 10 and rows.rows == 2  # rows 2 (4) and 1 (3) share the second forward row
    assert inputs["input_ids"][1, :7].tolist() == [14, 15, 16, 17, 11, 12, 13]
    assert inputs["position_ids"][1, :7].tolist() == [0, 1, 2, 3, 0, 1, 2]  # positions restart per segment
    assert rows.full_index[1, :3].tolist() == [14, 15, 16] and rows.full_index[2, :4].tolist() == [10, 11, 12, 13]
    allowed = inputs["attention_mask"][1, 0] == 0
    assert allowed[4].nonzero().flatten().tolist() == [4]  # row 1's first token sees nothing of row 2
    assert allowed[6].nonzero().flatten().tolist() == [4, 5, 6]
    assert allowed[8].nonzero().flatten().tolist() == [8]  # padding: itself only, and nothing reads it


@pytest.mark.parametrize("padding", ["left", "right, labels on pads"])
def test_left_padding_and_labels_on_pads_are_exact(tiny_tokenizer, padding):
    """Rows padded on the left; or labels on padded positions, so the loss reads outputs at pad queries
    (they see the row's real tokens, not themselves): the layout keeps every position the loss reads."""
    batch = _batch(tiny_tokenizer, 4)
    lengths = batch["attention_mask"].sum(1)
    if padding == "left":
        pad = batch["attention_mask"].shape[1] - lengths
        for key in ("input_ids", "attention_mask", "labels", "token_roles"):
            batch[key] = torch.stack([torch.roll(row, int(shift)) for row, shift in zip(batch[key], pad)])
    else:
        shortest = int(lengths.argmin())
        assert batch["attention_mask"].shape[1] - int(lengths[shortest]) >= 3
        end = int(lengths[shortest])  # predicted positions end and end + 1 are pads (their labels: end + 1, + 2)
        batch["labels"][shortest, end + 1:end + 3] = batch["input_ids"][shortest, 1:3]
    model = _family("stablelm", len(tiny_tokenizer), "sdpa").train()
    shared = _step(model, batch, tiny_tokenizer, "shared_prefix")
    stacked = _step(model, batch, tiny_tokenizer, "stacked")
    stacked64 = _step(copy.deepcopy(model).double(), batch, tiny_tokenizer, "stacked")
    for i in range(2):
        assert float((shared[i] - stacked[i]).abs().max()) <= ROUNDING_GROWTH * measured_floor(stacked[i],
                                                                                                 stacked64[i])


def _gpt2(vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=256))


def test_models_that_cannot_share_run_stacked_or_are_refused_when_forced(tiny_tokenizer):
    vocab = len(tiny_tokenizer)
    mistral = MistralForCausalLM(MistralConfig(vocab_size=vocab, num_key_value_heads=2, sliding_window=16, **SMALL))
    assert "sliding-window" in model_problem(mistral)
    assert "model type 'gpt2'" in model_problem(_gpt2(vocab))
    dropout = StableLmForCausalLM(tiny_stablelm_config(vocab, attention_dropout=0.1))
    assert "dropout (attention_dropout=0.1)" in model_problem(dropout)
    flash = _family("llama", vocab, "sdpa")
    flash.config._attn_implementation = "flash_attention_2"
    assert "flash_attention_2" in model_problem(flash)
    batch = _batch(tiny_tokenizer, 4)
    with pytest.raises(ValueError, match=r"forward_layout='shared_prefix'\) cannot run exactly here: model type 'gpt2'"):
        remask_step_loss(_gpt2(vocab), batch, tokenizer=tiny_tokenizer, forward_layout="shared_prefix")
    auto = remask_step_loss(_gpt2(vocab), batch, tokenizer=tiny_tokenizer, seed=1)
    stacked = remask_step_loss(_gpt2(vocab), batch, tokenizer=tiny_tokenizer, seed=1, forward_layout="stacked")
    assert all(torch.equal(auto[k], stacked[k]) for k in stacked)  # auto is the stacked layout, bit for bit


def test_the_trainer_says_which_layout_it_chose(tiny_tokenizer, caplog):
    with caplog.at_level(logging.INFO, logger="composer_remask.remask.algorithm"):
        trainer, _, _ = run(tiny_tokenizer, [remask := ReMask()], n=4)
    assert remask.forward_layout_in_use == "shared_prefix"
    assert "run in the shared_prefix layout" in caplog.text
    forced = ReMask(forward_layout="stacked")
    with caplog.at_level(logging.INFO, logger="composer_remask.remask.algorithm"):
        run(tiny_tokenizer, [forced], n=4)
    assert forced.forward_layout_in_use == "stacked" and "stacked layout (forward_layout='stacked')" in caplog.text
    assert "forward_layout='auto'" in repr(ReMask())
    with pytest.raises(ValueError, match="unknown forward_layout 'packed'"):
        ReMask(forward_layout="packed")


class _AddPositionIds:
    """A collator that also hands the model position ids (a per-row input the layout does not rebuild)."""

    def __call__(self, samples):
        batch = collate(samples)
        batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"]).clone()
        return batch


def test_a_batch_the_layout_cannot_rebuild_runs_stacked_under_auto(tiny_tokenizer, caplog):
    from composer import Trainer
    from torch.utils.data import DataLoader

    def fit(remask):
        model = build_model(tiny_tokenizer)
        loader = DataLoader(CoTDataset(tiny_tokenizer, 4), batch_size=4, collate_fn=_AddPositionIds())
        Trainer(model=model, train_dataloader=loader, max_duration="1ba", algorithms=[remask], device="cpu",
                progress_bar=False, seed=0, optimizers=torch.optim.SGD(model.parameters(), lr=0.5)).fit()
        return weights(model)

    with caplog.at_level(logging.INFO, logger="composer_remask.remask.algorithm"):
        auto = fit(ReMask(seed=1))
    assert "microbatches run in the stacked layout: the batch carries per-row inputs the layout does not " \
           "rebuild (position_ids)" in caplog.text
    assert max_weight_diff(auto, fit(ReMask(seed=1, forward_layout="stacked"))) == 0.0
    with pytest.raises(ValueError, match=r"cannot run this batch exactly: .*\(position_ids\)"):
        fit(ReMask(seed=1, forward_layout="shared_prefix"))


@pytest.mark.parametrize("impl", ["hidden", "logits"])
def test_train_metrics_see_the_full_rows_in_either_layout(tiny_tokenizer, impl):
    """Train metrics read the full rows' logits put back at their (B, T) places."""
    got = {layout: logged(run(tiny_tokenizer, [ReMask(loss_impl=impl, forward_layout=layout)], n=4)[2],
                          "metrics/train/LanguageCrossEntropy")[0] for layout in ("shared_prefix", "stacked")}
    ce = logged(run(tiny_tokenizer, [ReMask(loss_impl=impl, forward_layout="stacked")], n=4)[2],
                "loss/train/ce_full")[0]
    # Float32 routes to the batch's cross-entropy: within its rounding, measured in float64.
    tolerance = ROUNDING_GROWTH * ce_floor(tiny_tokenizer)
    assert got["shared_prefix"] == pytest.approx(got["stacked"], abs=tolerance)
    assert got["stacked"] == pytest.approx(ce, abs=tolerance)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_gives_the_same_step(tiny_tokenizer, forward_layout, reentrant):
    """Recomputing the decoder layers in backward (Hugging Face gradient checkpointing) changes nothing in
    either layout: the 4D mask and position ids are inputs of every recomputed layer."""
    model = _family("stablelm", len(tiny_tokenizer), "sdpa").train()
    batch = _batch(tiny_tokenizer)
    plain = _step(model, batch, tiny_tokenizer, forward_layout)
    plain64 = _step(copy.deepcopy(model).double(), batch, tiny_tokenizer, forward_layout)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert model.is_gradient_checkpointing
    checkpointed = _step(model, batch, tiny_tokenizer, forward_layout)
    for i, what in enumerate(("loss terms", "gradients")):
        diff = float((checkpointed[i] - plain[i]).abs().max())
        floor = measured_floor(plain[i], plain64[i])
        print(f"[{forward_layout}, reentrant={reentrant}] {what}: |checkpointed - plain| {diff:.2e} (floor {floor:.2e})")
        assert diff <= ROUNDING_GROWTH * floor, what


class _AddSequenceId:
    """llm-foundry's finetuning collator: ``sequence_id`` (attention mask - 1), which a Hugging Face model's
    forward does not take (Composer drops it), so it must not stop the shared-prefix layout."""

    def __call__(self, samples):
        batch = collate(samples)
        batch["sequence_id"] = batch["attention_mask"] - 1
        return batch


def test_per_row_keys_the_model_does_not_take_do_not_stop_sharing(tiny_tokenizer, caplog):
    from composer import Trainer
    from torch.utils.data import DataLoader

    model = build_model(tiny_tokenizer)
    loader = DataLoader(CoTDataset(tiny_tokenizer, 4), batch_size=4, collate_fn=_AddSequenceId())
    with caplog.at_level(logging.INFO, logger="composer_remask.remask.algorithm"):
        Trainer(model=model, train_dataloader=loader, max_duration="1ba", algorithms=[ReMask(forward_layout="shared_prefix")],
                device="cpu", progress_bar=False, seed=0).fit()
    assert "stacked layout" not in caplog.text
