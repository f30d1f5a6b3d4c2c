"""ReMask inside composer.Trainer: loss identity, metrics, accumulation, resume, edge cases."""

from __future__ import annotations

import math

import pytest
import torch
from composer import Trainer
from composer.core import DataSpec
from composer.loggers import InMemoryLogger
from torch.utils.data import DataLoader

from composer_remask import ReMask
from composer_remask.data.tokenizer import train_tiny_tokenizer
from tests.helpers.limits import CI_LIMIT_S
from tests.helpers.synthetic import CoTDataset, collate
from tests.helpers.tiny_model import TINY_TEXT
from tests.helpers.tolerances import (
    ROUNDING_GROWTH,
    ce_floor,
    float32_rounding_bound,
    float64_floor,
    run_floor,
)
from tests.helpers.training import build_model, logged, max_weight_diff, run, weights


@pytest.mark.parametrize("impl", ["hidden", "logits"])
def test_logged_total_is_the_identity_and_train_ce_is_ce_full(tiny_tokenizer, impl, forward_layout):
    algo = ReMask(mask_prob=0.4, weight=0.3, loss_impl=impl, seed=1, forward_layout=forward_layout)
    _, _, logger = run(tiny_tokenizer, [algo], microbatch=2, duration="3ba")
    total, ce_full = logged(logger, "loss/train/total"), logged(logger, "loss/train/ce_full")
    ce_masked, div = logged(logger, "loss/train/ce_masked"), logged(logger, "loss/train/divergence")
    assert len(total) == 3
    identity_error = max(abs(t - (0.5 * (f + m) + 0.3 * d)) for t, f, m, d in zip(total, ce_full, ce_masked, div))
    print(f"[{impl}] max |total - (0.5*(ce_full+ce_masked) + w*div)| = {identity_error:.2e}")
    # total = 0.5 (ce_full + ce_masked) + w div: 4 float32 roundings per sample, each part summed over the batch of 4.
    assert identity_error <= float32_rounding_bound(max(map(abs, total + ce_full + ce_masked + div)), 4 * 4)
    for f, m, d in zip(ce_full, ce_masked, div):
        assert d > 0 and m != f
    # The metric is logged at each batch end (and again at epoch end): pair it with each loss by time.
    metric = {(int(t.epoch), int(t.batch)): float(v) for t, v in logger.data["metrics/train/LanguageCrossEntropy"]}
    train_ce = [metric[(int(t.epoch), int(t.batch))] for t, _ in logger.data["loss/train/ce_full"]]
    metric_error = max(abs(metric - f) for metric, f in zip(train_ce, ce_full))
    print(f"[{impl}] max |train LanguageCrossEntropy - ce_full| = {metric_error:.2e}")
    assert metric_error <= ROUNDING_GROWTH * ce_floor(tiny_tokenizer)  # two float32 sums of the same CE terms
    fraction = logged(logger, "remask/mask_fraction")  # Not exactness: p=0.4 of ~44 rationale tokens, a seeded
    # draw (the same on every CPU); 0.4 +- 0.2 is ~2.7 binomial sigmas (sqrt(0.24/44) = 0.074): a rate near p.
    assert all(0.2 < x < 0.6 for x in fraction) and logged(logger, "remask/mask_prob") == [0.4] * 3


@pytest.mark.parametrize("microbatch", [1, 4])
def test_ce_full_is_the_models_own_loss_on_the_whole_batch(tiny_tokenizer, microbatch):
    """With no label rules, CE(full) of the first batch equals Hugging Face's token-mean loss."""
    model = build_model(tiny_tokenizer)
    batch = collate([CoTDataset(tiny_tokenizer, 4)[i] for i in range(4)])
    with torch.no_grad():
        expected = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               labels=batch["labels"]).loss.item()
    algo = ReMask(rationale_label_drop_prob=0.0, answer_only_prob=0.0, seed=0)
    _, _, logger = run(tiny_tokenizer, [algo], microbatch=microbatch, n=4)
    assert logged(logger, "loss/train/ce_full")[0] == pytest.approx(expected, abs=ROUNDING_GROWTH * ce_floor(tiny_tokenizer))


@pytest.mark.parametrize("on_tokens,token_spec,weighting", [
    (False, False, "samples"),  # Composer's default
    (True, False, "samples"),  # token accumulation, DataSpec counting padded tokens
    (True, True, "tokens"),  # token accumulation on loss-generating tokens
    (False, False, "auto"),  # nothing declared: read from the Trainer
    (True, False, "auto"),
    (True, True, "auto"),
])
def test_microbatch_size_does_not_change_the_step(tiny_tokenizer, on_tokens, token_spec, weighting, forward_layout):
    results = {}
    for microbatch in (1, 2, 4):
        algo = ReMask(mask_prob=0.4, weight=0.5, seed=3, loss_weighting=weighting, forward_layout=forward_layout)
        _, model, logger = run(tiny_tokenizer, [algo], microbatch=microbatch, on_tokens=on_tokens,
                               token_spec=token_spec)
        results[microbatch] = (weights(model), logged(logger, "loss/train/total")[0])
    reference_weights, reference_loss = results[4]
    # Noise floor: microbatch 4 against itself in float64 (float32's own rounding of this step).
    floor = run_floor(reference_weights, tiny_tokenizer, [ReMask(mask_prob=0.4, weight=0.5, seed=3, loss_weighting=weighting,
                                                                 forward_layout=forward_layout)],
                      microbatch=4, on_tokens=on_tokens, token_spec=token_spec)
    for microbatch in (1, 2):
        diff = max_weight_diff(results[microbatch][0], reference_weights)
        print(f"[{forward_layout}, {weighting}, on_tokens={on_tokens}] microbatch {microbatch} vs 4: max |dw| = {diff:.2e} (floor {floor:.2e})")
        assert diff <= ROUNDING_GROWTH * floor
        assert results[microbatch][1] == pytest.approx(reference_loss, abs=ROUNDING_GROWTH * ce_floor(tiny_tokenizer))


def test_microbatch_invariance_is_not_free(tiny_tokenizer):
    """The same check fails for a per-microbatch token mean (the test can tell them apart)."""
    losses = []
    for microbatch in (1, 4):
        _, model, _ = run(tiny_tokenizer, [], microbatch=microbatch)
        losses.append(weights(model))
    assert max_weight_diff(*losses) > 1e-4  # a real mistake: ~1e-3, far above the ~1e-6 bounds of the tests above


def test_hidden_and_logits_paths_train_identically(tiny_tokenizer, forward_layout):
    out = {}
    for impl in ("hidden", "logits"):
        algo = ReMask(mask_prob=0.5, weight=0.2, seed=5, loss_impl=impl, divergence="js", forward_layout=forward_layout)
        _, model, logger = run(tiny_tokenizer, [algo], microbatch=2, duration="2ba")
        out[impl] = (weights(model), logged(logger, "loss/train/total"))
    floor = run_floor(out["logits"][0], tiny_tokenizer, [ReMask(mask_prob=0.5, weight=0.2, seed=5, loss_impl="logits",
                                                               divergence="js", forward_layout=forward_layout)],
                      microbatch=2, duration="2ba")
    print(f"[{forward_layout}] hidden vs logits: max |dw| = {max_weight_diff(out['hidden'][0], out['logits'][0]):.2e} (floor {floor:.2e})")
    assert max_weight_diff(out["hidden"][0], out["logits"][0]) <= ROUNDING_GROWTH * floor
    assert out["hidden"][1] == pytest.approx(out["logits"][1], abs=ROUNDING_GROWTH * ce_floor(tiny_tokenizer))


def test_resume_from_a_checkpoint_continues_identically(tiny_tokenizer, tmp_path, forward_layout):
    _, _, full = run(tiny_tokenizer, [ReMask(forward_layout=forward_layout)], microbatch=2, duration="4ba", n=16, seed=7,
                     save_folder=str(tmp_path), save_interval="2ba")
    uninterrupted = logged(full, "loss/train/total")
    checkpoint = tmp_path / "ep0-ba2-rank0.pt"
    assert checkpoint.exists()
    # Another trainer seed: the masks must come from the checkpoint, not from the new trainer.
    _, _, resumed = run(tiny_tokenizer, [ReMask(forward_layout=forward_layout)], microbatch=2, duration="4ba", n=16, seed=99,
                        load_path=str(checkpoint))
    print(f"[{forward_layout}] uninterrupted batches 3-4: {uninterrupted[2:]}; resumed: {logged(resumed, 'loss/train/total')}")
    assert logged(resumed, "loss/train/total") == uninterrupted[2:]


def test_sft_mode_runs_one_pass_and_matches_hf_loss(tiny_tokenizer):
    model = build_model(tiny_tokenizer)
    batch = collate([CoTDataset(tiny_tokenizer, 4)[i] for i in range(4)])
    with torch.no_grad():
        expected = model.model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss.item()
    rows_seen = []
    model.model.register_forward_hook(lambda m, args, kwargs_out: None)
    model.model.model.register_forward_hook(lambda m, a, o: rows_seen.append(o.last_hidden_state.shape[0]))
    algo = ReMask(mask_prob=0.0, rationale_label_drop_prob=0.0, answer_only_prob=0.0)
    trainer = Trainer(model=model, train_dataloader=DataLoader(CoTDataset(tiny_tokenizer, 4), batch_size=4,
                                                               collate_fn=collate),
                      max_duration="1ba", algorithms=[algo], loggers=[logger := InMemoryLogger()], device="cpu",
                      device_train_microbatch_size=2, progress_bar=False,
                      optimizers=torch.optim.SGD(model.parameters(), lr=0.1))
    trainer.fit()
    assert rows_seen == [2, 2]  # no second pass
    assert "loss/train/ce_masked" not in logger.data
    assert logged(logger, "loss/train/total")[0] == pytest.approx(expected, abs=ROUNDING_GROWTH * ce_floor(tiny_tokenizer))


def test_masked_thought_has_no_divergence_gradient(tiny_tokenizer):
    _, _, logger = run(tiny_tokenizer, [ReMask(weight=0.0, seed=2)], microbatch=2)
    total = logged(logger, "loss/train/total")[0]
    ce = 0.5 * (logged(logger, "loss/train/ce_full")[0] + logged(logger, "loss/train/ce_masked")[0])
    # 0.5 (ce_full + ce_masked) + 0 * div: 4 float32 roundings per sample, summed over the batch of 4.
    assert total == pytest.approx(ce, abs=float32_rounding_bound(ce, 4 * 4)) and logged(logger, "loss/train/divergence")[0] > 0


@pytest.mark.parametrize("impl", ["hidden", "logits"])
def test_degenerate_batches_give_finite_losses(tiny_tokenizer, impl):
    data = CoTDataset(tiny_tokenizer, 4)
    ids, roles = data[1]
    data.examples[1] = (ids, [0] * len(roles))  # a sample with no label at all
    ids, roles = data[2]
    data.examples[2] = (ids, [0 if r == 2 else r for r in roles])  # labels but nothing maskable
    for algo in (ReMask(mask_prob=1.0, loss_impl=impl), ReMask(mask_prob=0.4, loss_impl=impl)):
        for on_tokens, weighting in ((False, "samples"), (True, "tokens")):
            algo.loss_weighting = weighting
            _, model, logger = run(tiny_tokenizer, [algo], microbatch=1, dataset=data, on_tokens=on_tokens,
                                   token_spec=on_tokens)
            assert all(math.isfinite(x) for x in logged(logger, "loss/train/total"))
            assert all(torch.isfinite(p).all() for p in model.parameters())


def test_batch_without_any_label_is_finite(tiny_tokenizer):
    data = CoTDataset(tiny_tokenizer, 4)
    data.examples = [(ids, [0] * len(roles)) for ids, roles in data.examples]
    _, model, logger = run(tiny_tokenizer, [ReMask()], microbatch=2, dataset=data)
    assert logged(logger, "loss/train/total") == [0.0]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_missing_mask_token_is_a_clear_error():
    plain = train_tiny_tokenizer(TINY_TEXT, 300, with_remask_tokens=False)
    with_tags = train_tiny_tokenizer(TINY_TEXT, 300)
    loader = DataLoader(CoTDataset(with_tags, 4), batch_size=4, collate_fn=collate)
    with pytest.raises(ValueError, match="no <\\|mask\\|> token.*add_remask_tokens"):
        Trainer(model=build_model(plain), train_dataloader=loader, max_duration="1ba", algorithms=[ReMask()],
                device="cpu")
    model = build_model(plain)
    model.tokenizer = None
    with pytest.raises(ValueError, match="no tokenizer"):
        Trainer(model=model, train_dataloader=loader, max_duration="1ba", algorithms=[ReMask()], device="cpu")
    # Other strategies need no mask token.
    Trainer(model=build_model(plain, vocab_size=len(with_tags)), train_dataloader=loader, max_duration="1ba",
            algorithms=[ReMask(mask_strategy="random")], device="cpu", progress_bar=False).fit()


def test_batches_without_labels_are_rejected(tiny_tokenizer):
    loader = DataLoader([{"input_ids": torch.ones(5, dtype=torch.long)}] * 4, batch_size=4)
    with pytest.raises(ValueError, match="labels"):
        Trainer(model=build_model(tiny_tokenizer), train_dataloader=loader, max_duration="1ba",
                algorithms=[ReMask()], device="cpu", progress_bar=False).fit()


def test_evaluation_is_untouched(tiny_tokenizer):
    results = []
    for algorithms in ([], [ReMask()]):
        model = build_model(tiny_tokenizer)
        eval_loader = DataLoader(CoTDataset(tiny_tokenizer, 8, seed=1), batch_size=4, collate_fn=collate)
        trainer = Trainer(model=model, eval_dataloader=eval_loader, algorithms=algorithms, device="cpu",
                          progress_bar=False, loggers=[logger := InMemoryLogger()])
        trainer.eval()
        results.append(logged(logger, "metrics/eval/LanguageCrossEntropy"))
    assert results[0] == results[1]


def test_state_dict_round_trip_keeps_composers_keys():
    algo = ReMask(seed=123)
    state = algo.state_dict()
    assert state["seed"] == 123 and state["repr"] == repr(algo)
    assert repr(algo) == repr(ReMask(seed=123)) and "mask_prob=0.4" in repr(algo)  # no object address
    other = ReMask()
    other.load_state_dict(state)
    assert other.state_dict()["seed"] == 123


@pytest.mark.parametrize("kwargs,match", [
    ({"mask_prob": 1.5}, "mask_prob"), ({"weight": -1}, "weight"), ({"divergence": "kl"}, "divergence"),
    ({"mask_strategy": "zero"}, "mask_strategy"), ({"loss_weighting": "rows"}, "loss_weighting"),
])
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReMask(**kwargs)


@pytest.mark.slow
@pytest.mark.dist
def test_two_processes_match_one_process(tmp_path, forward_layout):
    """DDP over gloo with 2 ranks x 2 samples trains exactly like 1 rank x 4 samples."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    script = repo / "tests" / "helpers" / "dist_train.py"
    env = {**os.environ, "PYTHONPATH": str(repo)}
    composer_bin = Path(sys.executable).with_name("composer")
    layout = ["--forward-layout", forward_layout]
    subprocess.run([sys.executable, str(script), str(tmp_path / "one.pt"), *layout], check=True, env=env, cwd=repo,
                   timeout=CI_LIMIT_S)
    port = {"shared_prefix": "29533", "stacked": "29534"}[forward_layout]
    subprocess.run([str(composer_bin), "-n", "2", "--master_port", port, "--stdout", str(tmp_path / "r{rank}.out"),
                    "--stderr", str(tmp_path / "r{rank}.err"), str(script), str(tmp_path / "two.pt"), *layout],
                   check=True, env=env, cwd=repo, timeout=CI_LIMIT_S)
    subprocess.run([sys.executable, str(script), str(tmp_path / "one64.pt"), "float64", *layout], check=True, env=env,
                   cwd=repo, timeout=CI_LIMIT_S)  # the one-process run in float64: float32's own rounding of these steps
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert (one["world"], two["world"]) == (1, 2)
    diff, floor = max_weight_diff(one["weights"], two["weights"]), float64_floor(one["weights"], torch.load(
        tmp_path / "one64.pt")["weights"])
    print(f"[{forward_layout}] 1 process losses {one['losses']}; 2 processes {two['losses']}; max |dw| = {diff:.2e} (floor {floor:.2e})")
    assert two["losses"] == pytest.approx(one["losses"], abs=ROUNDING_GROWTH * ce_floor(train_tiny_tokenizer(TINY_TEXT, 400)))
    assert diff <= ROUNDING_GROWTH * floor


@pytest.mark.parametrize("divergence", ["sym_kl", "js"])
def test_one_step_matches_an_independent_reference(tiny_tokenizer, divergence, forward_layout):
    """Trainer + ReMask (label drops, 2 microbatches) == textbook loss on the same masks, by autograd."""
    from composer_remask.remask.masking import MaskVocabulary, remask_batch
    from tests.helpers.reference_loss import reference_loss

    kwargs = dict(mask_prob=0.5, weight=0.7, divergence=divergence, rationale_label_drop_prob=0.3,
                  answer_only_prob=0.3, seed=21)
    _, trained, logger = run(tiny_tokenizer, [ReMask(**kwargs, forward_layout=forward_layout)], microbatch=2, n=4, lr=0.5)

    model = build_model(tiny_tokenizer)
    batch = collate([CoTDataset(tiny_tokenizer, 4)[i] for i in range(4)])
    mask_id = tiny_tokenizer.convert_tokens_to_ids("<|mask|>")
    masked = remask_batch(batch["input_ids"], batch["labels"], batch["token_roles"], batch["attention_mask"],
                          mask_prob=0.5, rationale_label_drop_prob=0.3, answer_only_prob=0.3, seed=21,
                          batch_index=0, vocabulary=MaskVocabulary(
                              mask_token_id=mask_id, protected_ids=torch.tensor(tiny_tokenizer.all_special_ids)))
    model.train()
    logits_full = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits_masked = model.model(input_ids=masked.masked_input_ids, attention_mask=batch["attention_mask"]).logits
    ref = reference_loss(logits_full, logits_masked, masked.labels, 0.7, divergence, masked.divergence_mask)
    ref["total"].backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 * p.grad
    # The reference's float32 forward and ReMask's are two float32 routes: their rounding, measured in float64.
    loss_tol, floor = ROUNDING_GROWTH * ce_floor(tiny_tokenizer), run_floor(
        weights(trained), tiny_tokenizer, [ReMask(**kwargs, forward_layout=forward_layout)], microbatch=2, n=4, lr=0.5)
    assert logged(logger, "loss/train/total")[0] == pytest.approx(ref["total"].item(), abs=loss_tol)
    assert logged(logger, "loss/train/divergence")[0] == pytest.approx(ref["divergence"].item(), abs=loss_tol)
    assert max_weight_diff(weights(trained), weights(model)) <= ROUNDING_GROWTH * floor


def test_a_loss_weighting_that_does_not_match_the_trainer_is_an_error(tiny_tokenizer):
    with pytest.raises(ValueError, match="loss_weighting='samples'.*does not match.*'auto'"):
        run(tiny_tokenizer, [ReMask(loss_weighting="samples")], microbatch=1, on_tokens=True, token_spec=True)


def test_mask_prob_warmup_is_linear_in_batches_with_epoch_durations(tiny_tokenizer):
    _, _, logger = run(tiny_tokenizer, [ReMask(mask_prob=0.4, mask_prob_warmup=0.5, seed=0)], microbatch=4,
                       n=16, duration="2ep")  # 4 batches per epoch, 8 in all, ramp over the first 4
    assert logged(logger, "remask/mask_prob") == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.4, 0.4, 0.4])


def test_models_that_transform_their_logits_are_refused_on_the_lean_path(tiny_tokenizer):
    model = build_model(tiny_tokenizer)
    model.model.lm_head.register_forward_hook(lambda module, args, out: out * 2.0)  # like Granite's scaling
    loader = DataLoader(CoTDataset(tiny_tokenizer, 4), batch_size=4, collate_fn=collate)
    trainer = Trainer(model=model, train_dataloader=loader, max_duration="1ba", device="cpu", progress_bar=False,
                      algorithms=[ReMask(loss_impl="hidden")])
    with pytest.raises(ValueError, match="loss_impl='logits'"):
        trainer.fit()


@pytest.mark.slow
@pytest.mark.dist
# Both FSDP1 parameter modes on the default layout; the stacked layout once (the flat-parameter handling
# it would test again does not depend on the layout); FSDP2 (fully_shard) in float32 and with bf16
# parameters, whose cast of the model's floating inputs (the shared-prefix mask) is not an edit.
@pytest.mark.parametrize("use_orig_params, forward_layout, sharding", [
    (True, "shared_prefix", "fsdp1"), (False, "shared_prefix", "fsdp1"), (True, "stacked", "fsdp1"),
    (True, "shared_prefix", "fsdp2"), (True, "shared_prefix", "fsdp2_bf16")])
def test_fsdp_step_matches_the_unwrapped_model(tmp_path, use_orig_params, forward_layout, sharding):
    """FSDP (2 ranks, gloo) with lm_head in the root unit trains like the plain model."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "diff"
    port = {(True, "shared_prefix", "fsdp1"): "29541", (False, "shared_prefix", "fsdp1"): "29542",
            (True, "stacked", "fsdp1"): "29543", (True, "shared_prefix", "fsdp2"): "29544",
            (True, "shared_prefix", "fsdp2_bf16"): "29545"}[use_orig_params, forward_layout, sharding]
    subprocess.run([str(Path(sys.executable).with_name("composer")), "-n", "2", "--master_port", port,
                    "--stdout", str(tmp_path / "r{rank}.out"), "--stderr", str(tmp_path / "r{rank}.err"),
                    str(repo / "tests" / "helpers" / "fsdp_step.py"), str(out), "1" if use_orig_params else "0",
                    forward_layout, sharding],
                   check=True, env={**os.environ, "PYTHONPATH": str(repo)}, cwd=repo, timeout=CI_LIMIT_S)
    diffs, floors = zip(*(map(float, (tmp_path / f"diff.rank{r}").read_text().split()) for r in range(2)))
    rounding = "bf16" if sharding == "fsdp2_bf16" else "float32"
    print(f"[{forward_layout}] {sharding} use_orig_params={use_orig_params}: max |w_fsdp - w_plain| per rank = "
          f"{diffs} ({rounding} rounding floor {floors})")
    assert all(diff <= ROUNDING_GROWTH * floor for diff, floor in zip(diffs, floors))


def test_auto_weighting_is_exact_whatever_the_dataspec_counts(tiny_tokenizer):
    """llm-foundry counts labelled tokens after ReMask-CoT's drops; nothing needs declaring."""
    def foundry_like_spec(loader):
        return DataSpec(loader, get_num_tokens_in_batch=lambda b: {
            "total": int(b["attention_mask"].sum()), "loss_generating": int((b["labels"][:, 1:] != -100).sum())})

    results = {}
    for microbatch in (1, 2, 4, "float64"):  # float64: microbatch 4 again, to measure float32's rounding
        model = build_model(tiny_tokenizer).to(torch.float64 if microbatch == "float64" else torch.float32)
        loader = DataLoader(CoTDataset(tiny_tokenizer, 8), batch_size=4, collate_fn=collate)
        logger = InMemoryLogger()
        Trainer(model=model, train_dataloader=foundry_like_spec(loader), max_duration="2ba", device="cpu",
                optimizers=torch.optim.SGD(model.parameters(), lr=0.5), loggers=[logger], progress_bar=False,
                algorithms=[ReMask(seed=3, rationale_label_drop_prob=0.5, answer_only_prob=0.3)],
                device_train_microbatch_size=4 if microbatch == "float64" else microbatch,
                accumulate_train_batch_on_tokens=True).fit()
        results[microbatch] = (weights(model), logged(logger, "loss/train/total"))
    floor = float64_floor(results[4][0], results["float64"][0])
    for microbatch in (1, 2):
        assert max_weight_diff(results[microbatch][0], results[4][0]) <= ROUNDING_GROWTH * floor
        assert results[microbatch][1] == pytest.approx(results[4][1], abs=ROUNDING_GROWTH * ce_floor(tiny_tokenizer))


def test_label_rules_set_explicitly_without_token_roles_warn_once(tiny_tokenizer):
    """An explicit rule that cannot apply warns once; the defaults (``None``: the card's 0.1 where roles
    exist) and rules turned off stay silent, as ``algorithms: {remask: {}}`` on llm-foundry's loaders does."""
    import warnings

    def collate_without_roles(examples):
        batch = collate(examples)
        del batch["token_roles"]
        return batch

    loader = DataLoader(CoTDataset(tiny_tokenizer, 8), batch_size=4, collate_fn=collate_without_roles)
    model = build_model(tiny_tokenizer)
    with pytest.warns(UserWarning, match="do nothing: the batches have no 'token_roles'") as record:
        Trainer(model=model, train_dataloader=loader, max_duration="2ba", device="cpu", progress_bar=False,
                optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
                algorithms=[ReMask(rationale_label_drop_prob=0.1)]).fit()
    assert sum("token_roles" in str(w.message) for w in record) == 1
    for quiet_algorithm in (ReMask(), ReMask(rationale_label_drop_prob=0, answer_only_prob=0)):
        with warnings.catch_warnings(record=True) as quiet:
            warnings.simplefilter("always")
            second = build_model(tiny_tokenizer)
            Trainer(model=second, train_dataloader=loader, max_duration="1ba", device="cpu", progress_bar=False,
                    algorithms=[quiet_algorithm], optimizers=torch.optim.SGD(second.parameters(), lr=0.1)).fit()
        assert not any("token_roles" in str(w.message) for w in quiet), quiet_algorithm


def test_auto_weighting_reads_tensor_counts(tiny_tokenizer):
    """Regression: llm-foundry's DataSpec returns its token counts as 0-d tensors."""
    results = {}
    for microbatch in (1, 4, "float64"):  # float64: microbatch 4 again, to measure float32's rounding
        model = build_model(tiny_tokenizer).to(torch.float64 if microbatch == "float64" else torch.float32)
        loader = DataLoader(CoTDataset(tiny_tokenizer, 8), batch_size=4, collate_fn=collate)
        spec = DataSpec(loader, get_num_tokens_in_batch=lambda b: {
            "total": b["attention_mask"].sum(), "loss_generating": (b["labels"][:, 1:] != -100).sum()})
        Trainer(model=model, train_dataloader=spec, max_duration="1ba", device="cpu", progress_bar=False,
                optimizers=torch.optim.SGD(model.parameters(), lr=0.5), algorithms=[ReMask(seed=3)],
                device_train_microbatch_size=4 if microbatch == "float64" else microbatch,
                accumulate_train_batch_on_tokens=True).fit()
        results[microbatch] = weights(model)
    assert max_weight_diff(results[1], results[4]) <= ROUNDING_GROWTH * float64_floor(results[4], results["float64"])


def test_a_microbatch_composer_weighs_zero_while_it_holds_tokens_is_an_error(tiny_tokenizer):
    """A DataSpec that counts no loss-generating token in a microbatch with labels would drop them silently."""
    loader = DataLoader(CoTDataset(tiny_tokenizer, 4), batch_size=4, collate_fn=collate)
    spec = DataSpec(loader, get_num_tokens_in_batch=lambda b: {
        # the first microbatch (a view at offset 0 of the batch) counts tokens, the second none
        "total": int(b["attention_mask"].sum()), "loss_generating": 5 if b["input_ids"].storage_offset() == 0 else 0})
    model = build_model(tiny_tokenizer)
    with pytest.raises(ValueError, match="weight 0"):
        Trainer(model=model, train_dataloader=spec, max_duration="1ba", device="cpu", progress_bar=False,
                optimizers=torch.optim.SGD(model.parameters(), lr=0.1), algorithms=[ReMask()],
                device_train_microbatch_size=2, accumulate_train_batch_on_tokens=True).fit()


def test_uneven_last_microbatch_is_exact(tiny_tokenizer, forward_layout):
    results = {}
    for microbatch in (3, 4):
        _, model, logger = run(tiny_tokenizer, [ReMask(seed=9, forward_layout=forward_layout)], microbatch=microbatch)
        results[microbatch] = (weights(model), logged(logger, "loss/train/total"))
    floor = run_floor(results[4][0], tiny_tokenizer, [ReMask(seed=9, forward_layout=forward_layout)],
                      microbatch=4)  # microbatch 4 in float64
    assert max_weight_diff(results[3][0], results[4][0]) <= ROUNDING_GROWTH * floor
    assert results[3][1] == pytest.approx(results[4][1], abs=ROUNDING_GROWTH * ce_floor(tiny_tokenizer))


def _first_inputs_and_losses(tokenizer, algo):
    """The input_ids the model saw in the first forward, and the logged losses of one batch."""
    seen = []
    model = build_model(tokenizer)
    model.model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["input_ids"].clone()),
                                          with_kwargs=True)
    loader = DataLoader(CoTDataset(tokenizer, 4), batch_size=4, collate_fn=collate)
    trainer = Trainer(model=model, train_dataloader=loader, max_duration="1ba", algorithms=[algo],
                      loggers=[logger := InMemoryLogger()], device="cpu", device_train_microbatch_size=4,
                      progress_bar=False, optimizers=torch.optim.SGD(model.parameters(), lr=0.1))
    trainer.fit()
    return seen[0], {k.removeprefix("loss/train/"): logged(logger, k)[0] for k in logger.data
                     if k.startswith("loss/train/")}


@pytest.mark.parametrize("strategy", ["mask_token", "random"])
def test_masked_only_is_one_pass_on_the_masked_half_of_the_two_pass_run(tiny_tokenizer, strategy):
    """Masked Thought as its paper trains it: the model sees exactly ReMask's masked rows, once, and
    the loss is Hugging Face's own CE on them against the labels."""
    no_rules = dict(rationale_label_drop_prob=0.0, answer_only_prob=0.0, seed=4, mask_strategy=strategy)
    # The stacked layout, whose model input holds the masked rows whole.
    both_ids, both = _first_inputs_and_losses(tiny_tokenizer, ReMask(mask_prob=0.4, weight=0.0, forward_layout="stacked",
                                                                     **no_rules))
    only_ids, only = _first_inputs_and_losses(tiny_tokenizer, ReMask(mask_prob=0.4, weight=0.0, masked_only=True,
                                                                     **no_rules))
    _, sft = _first_inputs_and_losses(tiny_tokenizer, ReMask(mask_prob=0.0, **no_rules))
    rows = only_ids.shape[0]
    assert both_ids.shape[0] == 2 * rows and torch.equal(only_ids, both_ids[rows:])
    assert not torch.equal(only_ids, both_ids[:rows])
    assert set(only) == {"total", "ce_masked"}
    # Noise floor: the same rows computed inside a [full; masked] forward and in a forward of their own.
    floor = abs(both["ce_full"] - sft["ce_full"])
    bound = 4 * floor + 8 * torch.finfo(torch.float32).eps * abs(both["ce_masked"])
    print(f"[{strategy}] |ce_masked(one pass) - ce_masked(two passes)| = "
          f"{abs(only['ce_masked'] - both['ce_masked']):.2e} (floor {floor:.2e}, bound {bound:.2e})")
    assert abs(only["ce_masked"] - both["ce_masked"]) <= bound
    assert only["total"] == only["ce_masked"]
    batch = collate([CoTDataset(tiny_tokenizer, 4)[i] for i in range(4)])
    with torch.no_grad():
        expected = build_model(tiny_tokenizer).model(input_ids=only_ids, attention_mask=batch["attention_mask"],
                                                     labels=batch["labels"]).loss.item()
    assert abs(only["total"] - expected) <= bound


def test_masked_only_refuses_a_divergence_weight_and_non_bools():
    with pytest.raises(ValueError, match="masked_only=True.*weight=0"):
        ReMask(masked_only=True, weight=0.1)
    with pytest.raises(TypeError, match="ReMask: masked_only expected bool, got 'False'"):
        ReMask(masked_only="False", weight=0.0)
    assert "masked_only=True" in repr(ReMask(masked_only=True, weight=0.0))


@pytest.mark.parametrize("argument, value, message", [
    ("detach_full", "False", "detach_full expected bool, got 'False'"),   # was truthy: trained as True
    ("detach_full", 0, "detach_full expected bool, got 0"),
    ("mask_prob", True, "mask_prob expected float, got True"),           # a bool is not a number
    ("mask_prob", "0.4", "mask_prob expected float, got '0.4'"),
    ("seed", 1.5, "seed expected int or null, got 1.5"),               # was truncated to 1
    ("seed", True, "seed expected int or null, got True"),
    ("chunk_rows", 2.0, "chunk_rows expected int or null, got 2.0"),
    ("mask_token_id", "5", "mask_token_id expected int or null, got '5'"),
    ("divergence", 3, "divergence expected str, got 3"),
])
def test_python_arguments_of_the_wrong_type_are_refused_not_reinterpreted(argument, value, message):
    with pytest.raises(TypeError, match=f"^ReMask: {message}"):
        ReMask(**{argument: value})


@pytest.mark.parametrize("argument, value", [("seed", -1), ("chunk_rows", 0), ("mask_token_id", -3)])
def test_python_arguments_out_of_range_are_named(argument, value):
    with pytest.raises(ValueError, match=f"ReMask: {argument} must be >= "):
        ReMask(**{argument: value})


def test_numpy_numbers_are_numbers_and_stored_as_validated():
    import numpy as np

    algo = ReMask(mask_prob=np.float32(0.25), seed=np.int64(7), weight=1, chunk_rows=np.int32(3))
    assert (algo.mask_prob, algo.weight, algo.seed, algo.chunk_rows) == (0.25, 1.0, 7, 3)
    assert type(algo.mask_prob) is float and type(algo.seed) is int and type(algo.chunk_rows) is int


def _labelled_batches(tokenizer, edit):
    """Four synthetic CoT samples as one batch, with ``edit(labels)`` applied to the labels."""
    def collate_and_edit(samples):
        batch = collate(samples)
        batch["labels"] = edit(batch["labels"])
        return batch

    return DataLoader(CoTDataset(tokenizer, 4), batch_size=4, collate_fn=collate_and_edit)


@pytest.mark.parametrize("impl", ["hidden", "logits"])
@pytest.mark.parametrize("edit, message", [
    # A collator that marks ignored positions with -1: cross-entropy read it as token id 0 (trained
    # EOS at every prompt position) instead of refusing it.
    (lambda labels: torch.where(labels == -100, torch.full_like(labels, -1), labels),
     r"holds -1 at row 0, position 0 \(\d+ such labels in the batch\): use -100 where nothing is predicted"),
    (lambda labels: torch.where(labels == -100, labels, labels + 10_000), r"holds \d+ at row 0, .*vocabulary has \d+"),
    (lambda labels: labels.float(), r"must be an integer tensor of token ids \(torch.long\), got torch.float32"),
    (lambda labels: labels[:, 1:], r"\(\d+, \d+\) must have the shape of batch\['input_ids'\]"),
])
def test_labels_outside_the_contract_are_named_errors(tiny_tokenizer, impl, edit, message):
    model = build_model(tiny_tokenizer)
    trainer = Trainer(model=model, train_dataloader=_labelled_batches(tiny_tokenizer, edit), max_duration="1ba",
                      algorithms=[ReMask(loss_impl=impl)], device="cpu", progress_bar=False)
    with pytest.raises(ValueError, match=f"ReMask: batch\\['labels'\\] {message}"):
        trainer.fit()


def test_a_batch_without_labels_warns_and_is_counted(tiny_tokenizer):
    """A collator that ignores every label used to give loss 0.0 on every batch without a word."""
    loader = _labelled_batches(tiny_tokenizer, lambda labels: torch.full_like(labels, -100))
    logger = InMemoryLogger()
    with pytest.warns(RuntimeWarning, match="a batch has no label to train on"):
        Trainer(model=build_model(tiny_tokenizer), train_dataloader=loader, max_duration="2ba",
                algorithms=[ReMask()], device="cpu", progress_bar=False, loggers=[logger]).fit()
    assert logged(logger, "remask/batches_without_labels") == [1.0, 2.0]


@pytest.mark.parametrize("loss_weighting", ["auto", "tokens"])
def test_a_batch_without_labels_under_token_weighting_is_a_named_error(tiny_tokenizer, loss_weighting):
    """Composer divides each microbatch's loss by the batch's loss-generating tokens: with none, it used to
    end in a raw ZeroDivisionError (after ReMask's warning). It is refused before the forward, by name."""
    from composer.core import DataSpec

    from composer_remask.data.dataset import get_num_tokens_in_batch

    loader = DataSpec(_labelled_batches(tiny_tokenizer, lambda labels: torch.full_like(labels, -100)),
                      get_num_tokens_in_batch=get_num_tokens_in_batch)  # counts loss-generating tokens
    trainer = Trainer(model=build_model(tiny_tokenizer), train_dataloader=loader, max_duration="1ba",
                      algorithms=[ReMask(loss_weighting=loss_weighting)], device="cpu", progress_bar=False,
                      accumulate_train_batch_on_tokens=True)
    with pytest.warns(RuntimeWarning, match="a batch has no label to train on"), \
            pytest.raises(ValueError, match=r"ReMask: batch 0 has no loss-generating token .*"
                                            r"accumulate_train_batch_on_tokens=True.*divide by zero"):
        trainer.fit()
