"""ReMask as a Composer algorithm: a thin event adapter over the named parts (docs/design.md#events).

* ``FIT_START``: settle the mask seed (given, restored from a checkpoint, or the restored
  ``rank_zero_seed``) and make ``flops_per_batch`` count the passes the layout runs, for this fit only.
* ``BATCH_START`` (whole device batch, after every algorithm's ``AFTER_DATALOADER``, so the list
  order does not matter): label rules and masks (:mod:`composer_remask.remask.masking`), global counts
  (:mod:`composer_remask.remask.loss_weighting`). What the batch looked like is recorded in it.
* ``BEFORE_FORWARD`` (one microbatch): check the microbatch is still what was prepared, then run
  both passes in one forward (one FSDP all-gather): shared prefixes
  (:mod:`composer_remask.remask.shared_prefix`) where the model takes them, else ``[full; masked]``.
* ``AFTER_FORWARD``: the loss at predicted positions only (:mod:`composer_remask.remask.hidden_states`,
  :mod:`composer_remask.remask.loss`), scaled to the exact global token mean; the full half of the
  batch and outputs are put back so train metrics measure the full sequence.
* ``AFTER_LOSS``: ``state.loss`` becomes ``{total, ce_full, ce_masked, divergence}``.
* ``AFTER_TRAIN_BATCH`` (before the optimizer step): every prepared row was trained exactly once.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from composer.core import Algorithm, Event, State
from composer.core.precision import get_precision_context
from composer.loggers import Logger
from composer.utils import dist
from transformers.modeling_outputs import CausalLMOutputWithPast

from composer_remask._private_api import (
    composer_microbatch_counts,
    composer_microbatch_weight,
    loss_scaled_in_place,
)
from composer_remask.arguments import check_arguments
from composer_remask.batch import (
    DIVERGENCE_MASK_KEY,
    LAYOUT_FULL,
    LAYOUT_FULL_AND_MASKED,
    TOKEN_ROLES_KEY,
    forward_passes,
)
from composer_remask.checks import finite_number
from composer_remask.remask.functional import microbatch_loss
from composer_remask.remask.hidden_states import (
    LOSS_IMPLS,
    HiddenStateCapture,
    choose_loss_impl,
    gather_loss_rows,
    output_logits,
)
from composer_remask.remask.loss import predicted_positions
from composer_remask.remask.loss_weighting import (
    LOSS_WEIGHTINGS,
    GlobalCounts,
    WeightingProbe,
    declared_microbatch_weight,
    microbatch_scales,
)
from composer_remask.remask.masking import MaskVocabulary
from composer_remask.remask.options import RemaskOptions, at_least
from composer_remask.remask.prepared_batch import microbatch_problem, model_inputs, passes_run, prepare_batch
from composer_remask.remask.shared_prefix import (
    FORWARD_LAYOUT_AUTO,
    FORWARD_LAYOUT_SHARED,
    FORWARD_LAYOUT_STACKED,
    FORWARD_LAYOUTS,
    SharedPrefixRows,
    attention_mask_dtype,
    choose_shared_prefix,
)
from composer_remask.runtime import ForwardPreHook, PassCountingFlops, run_length_in_batches, unwrap_ddp

log = logging.getLogger(__name__)

# ReMask's arguments that are not the method's options (RemaskOptions): how it runs inside a Trainer.
_TRAINER_ARGUMENTS = ("mask_prob_warmup", "seed", "loss_weighting", "loss_impl", "chunk_rows", "forward_layout")


class ReMask(Algorithm):
    """Regularized masking (ReMask / ReMask-CoT) for causal LM fine-tuning.

    The loss is ``0.5 * (CE_masked + CE_full) + weight * D(p_masked, p_full)``, where the masked
    sequence has each response/rationale input token replaced with probability ``mask_prob``.

    Args:
        mask_prob: probability of replacing each maskable input token (card: 0.4). ``0`` runs one
            pass: SFT (with the ReMask-CoT label rules unless both of their probabilities are 0).
        weight: weight of the divergence (card: 0.1). ``0`` is Masked Thought.
        divergence: ``sym_kl`` (mean of forward and backward KL), ``forward_kl``, ``reverse_kl``,
            ``js`` or ``mse`` (on log-probabilities).
        mask_strategy: ``mask_token`` (the tokenizer's ``<|mask|>``), ``random`` (uniform over the
            vocabulary, never a special token) or ``pad``.
        mask_token_id: id of the mask token; ``None`` looks up ``<|mask|>`` in the model's tokenizer.
        rationale_label_drop_prob: per-token probability of dropping a rationale label; ``None``
            (default) is the card's 0.1. Needs ``token_roles`` in the batches: batches without them
            (llm-foundry's own loaders) train without the rule, silently by default and with a
            warning when a value above 0 is set here.
        answer_only_prob: per-example probability of dropping every rationale label; ``None``
            (default) is the card's 0.1, with the same ``token_roles`` rule.
        mask_prob_warmup: fraction of training over which ``mask_prob`` ramps linearly from 0.
        detach_full: stop the divergence's gradient through the full pass (teacher-style).
        masked_only: train one pass on the masked input only, with the cross-entropy against the
            labels (Masked Thought as its paper trains it; pair it with ``mask_strategy="random"``
            for its GSM8K setting). Needs ``weight=0``: there is no full pass to compare with.
            ``weight=0`` alone is the card's run without regularization (both passes).
        seed: seed of the masks; ``None`` uses the trainer's ``rank_zero_seed`` (the restored one
            when resuming). Saved in checkpoints, so a resumed run draws the same masks.
        loss_weighting: ``auto`` (default) reads the weight the Trainer gives each microbatch
            (sample or token accumulation, any DataSpec), so the loss is exact with no setting.
            ``samples`` or ``tokens`` declare it instead (``tokens``: loss-generating tokens as
            ``composer_remask.batch.batch_loss_tokens`` counts them); this project's recipes declare
            it from their Trainer's settings. Checked on the first microbatch.
        loss_impl: ``hidden`` computes logits chunk by chunk from the final hidden states (lean),
            ``logits`` uses the model's logits; ``auto`` picks ``hidden`` when the model allows it.
        forward_layout: how the two passes run in their one forward. ``shared_prefix`` runs each row
            once with its masked suffix appended (a custom attention mask; the unmasked prefix is
            not recomputed); ``stacked`` runs ``[full; masked]`` along the batch; ``auto`` (default)
            picks ``shared_prefix`` where the model and batch allow it, and says which it chose.
            Both give the same loss and gradients (to float rounding).

    Example::

        trainer = Trainer(model=hf_model, train_dataloader=loader, max_duration="1ep",
                          algorithms=[ReMask(mask_prob=0.4, weight=0.1)])
        trainer.fit()
    """

    def __init__(
        self,
        mask_prob: float = RemaskOptions.mask_prob,
        weight: float = RemaskOptions.divergence_weight,
        divergence: str = RemaskOptions.divergence,
        mask_strategy: str = RemaskOptions.mask_strategy,
        mask_token_id: int | None = RemaskOptions.mask_token_id,
        rationale_label_drop_prob: float | None = RemaskOptions.rationale_label_drop_prob,
        answer_only_prob: float | None = RemaskOptions.answer_only_prob,
        mask_prob_warmup: float = 0.0,
        detach_full: bool = RemaskOptions.detach_full,
        masked_only: bool = RemaskOptions.masked_only,
        seed: int | None = None,
        loss_weighting: str = "auto",
        loss_impl: str = "auto",
        chunk_rows: int | None = None,
        forward_layout: str = FORWARD_LAYOUT_AUTO,
    ) -> None:
        arguments = locals()
        # The method's options are checked (types, then values) once, in RemaskOptions; the
        # Trainer-side ones here, against the same type hints the recipes use.
        check_arguments(ReMask.__init__, {name: arguments[name] for name in _TRAINER_ARGUMENTS}, "ReMask")
        self.options = RemaskOptions(mask_prob, weight, divergence, mask_strategy, mask_token_id,
                                     rationale_label_drop_prob, answer_only_prob, detach_full, masked_only)
        self.mask_prob_warmup = finite_number(mask_prob_warmup, "ReMask: mask_prob_warmup", low=0.0, high=1.0)
        for name, value, allowed in (("loss_weighting", loss_weighting, LOSS_WEIGHTINGS),
                                     ("loss_impl", loss_impl, LOSS_IMPLS),
                                     ("forward_layout", forward_layout, FORWARD_LAYOUTS)):
            if value not in allowed:
                raise ValueError(f"ReMask: unknown {name} {value!r}; choose one of {tuple(allowed)}")
        self.seed = at_least("seed", seed, 0)
        self.loss_weighting = loss_weighting
        self.loss_impl = loss_impl
        self.chunk_rows = at_least("chunk_rows", chunk_rows, 1)
        self.forward_layout = forward_layout
        self._reset()

    def _reset(self) -> None:
        """Per-Trainer state (a ReMask object may serve several Trainers in turn)."""
        if hasattr(self, "_capture"):
            self._capture.remove()  # hooks left by a forward that never finished
            self._input_check.remove()
        self._seed: int | None = None  # settled at FIT_START or restored from a checkpoint
        self._composer_model: Any = None
        self._vocabulary = MaskVocabulary(self.options.mask_strategy, self.options.mask_token_id)
        self._impl = "logits"
        self._shares_prefix = False  # decided at INIT (the model), per microbatch when auto (the batch)
        self._stacked_reason: str | None = None
        self._warned_stacked_batch = False
        self._shared_rows: SharedPrefixRows | None = None  # per microbatch
        self._mask_dtype = torch.float32
        self._model_takes: frozenset[str] | None = None  # the model's forward arguments
        self._capture = HiddenStateCapture()
        self._input_check = ForwardPreHook()
        self._probe = WeightingProbe()
        self._flops = PassCountingFlops()
        self._warned_no_roles = self._warned_fallback = False
        self._batches_without_labels = 0
        self._inputs: tuple[dict[str, Any], dict[str, tuple[torch.Tensor, int]]] | None = None
        self._counts = GlobalCounts(0.0, 0.0, 0.0, 0.0, 0.0)  # per batch
        self._prepared_rows = self._trained_rows = 0
        self._full_batch: dict[str, Any] | None = None  # per microbatch
        self._loss: dict[str, torch.Tensor] | None = None

    @property
    def mask_prob(self) -> float:
        """The mask rate after warm-up (``current_mask_prob`` gives the rate of a batch)."""
        return self.options.mask_prob

    @property
    def weight(self) -> float:
        """The divergence weight, by its public name (``ReMask(weight=...)``, the card's)."""
        return self.options.divergence_weight

    @property
    def layout(self) -> str:
        """Which passes run (``composer_remask.batch.LAYOUTS``): ``mask_prob == 0`` is one full pass."""
        return self.options.layout

    @property
    def two_pass(self) -> bool:
        """Whether a masked second pass runs next to the full one."""
        return self.layout == LAYOUT_FULL_AND_MASKED

    @property
    def forward_layout_in_use(self) -> str:
        """The layout the two passes run in (``shared_prefix`` or ``stacked``), as decided at ``Event.INIT``."""
        return FORWARD_LAYOUT_SHARED if self._shares_prefix else FORWARD_LAYOUT_STACKED

    @property
    def draws_masks(self) -> bool:
        """Whether some pass runs on masked input."""
        return self.layout != LAYOUT_FULL

    # ----------------------------------------------------------------------------- Composer hooks

    _EVENTS = (Event.INIT, Event.FIT_START, Event.BATCH_START, Event.BEFORE_TRAIN_BATCH, Event.BEFORE_FORWARD,
               Event.AFTER_FORWARD, Event.AFTER_LOSS, Event.AFTER_TRAIN_BATCH, Event.FIT_END)

    def match(self, event: Event, state: State) -> bool:
        return event in self._EVENTS or (event == Event.AFTER_BACKWARD and self._probe.armed)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self._init(state)
        elif event == Event.FIT_START:
            self._fit_start(state)
        elif event == Event.BATCH_START:
            self._prepare_batch(state, logger)
        elif event == Event.BEFORE_TRAIN_BATCH:
            self._trained_rows = 0  # again for each closure call (SAM) or OOM retry
        elif event == Event.BEFORE_FORWARD:
            self._double_batch(state)
        elif event == Event.AFTER_FORWARD:
            self._compute_loss(state)
        elif event == Event.AFTER_LOSS:
            assert self._loss is not None
            state.loss, self._loss = self._loss, None
        elif event == Event.AFTER_BACKWARD:
            self._check_weighting()
        elif event == Event.AFTER_TRAIN_BATCH:
            self._check_every_row_trained()
        elif event == Event.FIT_END:
            self._flops.restore()
            self._capture.remove()
            self._input_check.remove()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "seed": self._seed if self._seed is not None else self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed") is not None:
            self._seed = int(state["seed"])
            if self.seed is not None and int(self.seed) != self._seed:
                warnings.warn(f"ReMask: the checkpoint's mask seed {self._seed} replaces seed={self.seed}, so the "
                              "resumed run draws the masks the interrupted run would have drawn.", stacklevel=2)

    def __repr__(self) -> str:
        o = self.options
        arguments = {"mask_prob": o.mask_prob, "weight": o.divergence_weight, "divergence": o.divergence,
                     "mask_strategy": o.mask_strategy, "mask_token_id": o.mask_token_id,
                     "rationale_label_drop_prob": o.rationale_label_drop_prob, "answer_only_prob": o.answer_only_prob,
                     "mask_prob_warmup": self.mask_prob_warmup, "detach_full": o.detach_full,
                     "masked_only": o.masked_only, "seed": self.seed, "loss_weighting": self.loss_weighting,
                     "loss_impl": self.loss_impl, "chunk_rows": self.chunk_rows, "forward_layout": self.forward_layout}
        return f"ReMask({', '.join(f'{name}={value!r}' for name, value in arguments.items())})"

    # ------------------------------------------------------------------------------- INIT / FIT

    def _init(self, state: State) -> None:
        self._reset()
        model = unwrap_ddp(state.model)
        self._composer_model = model
        hf_model = getattr(model, "model", None)
        self._vocabulary = MaskVocabulary.from_model(hf_model, getattr(model, "tokenizer", None),
                                                     self.options.mask_strategy, self.options.mask_token_id,
                                                     replaces=self.draws_masks)
        self._impl = choose_loss_impl(self.loss_impl, hf_model, getattr(model, "model_forward_args", None))
        forward_args = getattr(model, "model_forward_args", None)
        # Shared prefixes need a HuggingFaceModel (it names the forward's arguments); anything else runs stacked.
        self._choose_forward_layout(hf_model if forward_args is not None else None)
        self._model_takes = None if forward_args is None else frozenset(forward_args)

    def _choose_forward_layout(self, hf_model: Any) -> None:
        """Once per Trainer: shared prefixes where the model takes them (or as forced), else stacked."""
        self._shares_prefix, self._stacked_reason = False, None
        if self.two_pass:
            self._shares_prefix, self._stacked_reason = choose_shared_prefix(self.forward_layout, hf_model)
            self._mask_dtype = attention_mask_dtype(hf_model)

    def _fit_start(self, state: State) -> None:
        if self._seed is None:  # not restored from a checkpoint: state.rank_zero_seed is final now
            self._seed = int(self.seed) if self.seed is not None else int(state.rank_zero_seed)
        if self.two_pass:
            self._flops.install(self._composer_model, functools.partial(
                passes_run, share_prefix=self._shares_prefix, model_takes=self._model_takes))
            reason = f" ({self._stacked_reason})" if self._stacked_reason else ""
            log.info("ReMask: the full and masked passes run in the %s layout%s.", self.forward_layout_in_use, reason)

    # ------------------------------------------------------------------------------- BATCH_START

    def current_mask_prob(self, state: State) -> float:
        """``mask_prob``, ramped linearly over the first ``mask_prob_warmup`` of training."""
        if self.mask_prob_warmup <= 0:
            return self.mask_prob
        total = run_length_in_batches(state)
        if total is not None:
            # Counted in batches: epoch durations advance once per epoch, and the ramp must be linear.
            elapsed = int(state.timestamp.batch) / total if total > 0 else 1.0
        else:
            fraction = state.get_elapsed_duration()
            if fraction is None:
                return self.mask_prob
            elapsed = float(fraction.value)
        return self.mask_prob * min(1.0, elapsed / self.mask_prob_warmup)

    def _prepare_batch(self, state: State, logger: Logger) -> None:
        mask_prob = self.current_mask_prob(state) if self.draws_masks else 0.0
        drop, answer_only = self.options.label_rule_probs
        state.batch, local = prepare_batch(  # checks the batch contract first (labels and their values)
            state.batch, self._vocabulary, mask_prob=mask_prob, layout=self.layout, seed=int(self._seed or 0),
            batch_index=int(state.timestamp.batch), rationale_label_drop_prob=drop, answer_only_prob=answer_only)
        self._warn_if_label_rules_do_nothing(state.batch)
        self._counts = GlobalCounts.gather(local, state.device)
        self._prepared_rows = int(local[0])
        if self._counts.divergence_tokens == 0:
            self._batches_without_labels += 1
            logger.log_metrics({"remask/batches_without_labels": self._batches_without_labels})
            warnings.warn(
                "ReMask: a batch has no label to train on (every label is -100 on every rank), so its loss is 0 and "
                "it trains nothing. A few such batches happen with very short responses; if every batch does, the "
                "collator marks the responses as ignored too (remask/batches_without_labels counts them).",
                RuntimeWarning, stacklevel=2)
        if self.draws_masks:
            maskable = self._counts.maskable
            logger.log_metrics({"remask/mask_prob": mask_prob,
                                "remask/mask_fraction": self._counts.masked / maskable if maskable else 0.0})

    def _warn_if_label_rules_do_nothing(self, batch: Mapping[str, Any]) -> None:
        if self._warned_no_roles or TOKEN_ROLES_KEY in batch:
            return
        # Left at None (the card's default) the rules are silently off without roles; set, they are warned about.
        drop, answer_only = self.options.rationale_label_drop_prob, self.options.answer_only_prob
        if self.options.explicit_label_rules:
            self._warned_no_roles = True
            warnings.warn(
                f"ReMask: rationale_label_drop_prob={drop} and answer_only_prob={answer_only} do nothing: the batches have no '{TOKEN_ROLES_KEY}', so no token is known "
                "to be rationale. Use composer_remask's MDS loader (composer_remask.data.dataset; in llm-foundry "
                "train_loader: {name: remask_mds}) or a collator that sets token roles, or set both to 0 to silence "
                "this.", stacklevel=2)

    # ------------------------------------------------------------------------------ BEFORE_FORWARD

    def _double_batch(self, state: State) -> None:
        self._refuse_batch_composer_divides_by_zero(state)
        problem = microbatch_problem(state.batch, self._vocabulary, self.layout)
        if problem is not None:
            others = [type(a).__name__ for a in state.algorithms if a is not self]
            raise RuntimeError(
                f"ReMask: the microbatch changed after ReMask prepared the batch at Event.BATCH_START ({problem}), "
                "so its token means would not be exact. Something edits microbatches later: an algorithm or callback "
                "at Event.BATCH_START/BEFORE_TRAIN_BATCH/BEFORE_FORWARD, or a DataSpec's split_batch or "
                "microbatch_transforms "
                f"(other algorithms here: {others or 'none'}). Edit batches at Event.AFTER_DATALOADER instead; "
                "any list order works there.")
        self._full_batch = dict(state.batch)
        self._trained_rows += int(state.batch["input_ids"].shape[0])
        inputs = self._model_inputs(state.batch)
        if self._impl == "hidden":
            inputs["logits_to_keep"] = 1
            self._capture.install(self._composer_model.model)
        state.batch = inputs
        self._inputs = (inputs, {k: (v, v._version) for k, v in inputs.items() if isinstance(v, torch.Tensor)})
        self._input_check.install(self._composer_model.model, self._check_inputs_as_the_model_starts)

    def _refuse_batch_composer_divides_by_zero(self, state: State) -> None:
        """Composer divides each microbatch's loss by the batch's count; with token weighting and no
        loss-generating token that count is 0, and it would end in a raw ZeroDivisionError after the forward."""
        counts = composer_microbatch_counts()
        if counts is None or counts[1] > 0:
            return
        raise ValueError(
            f"ReMask: batch {int(state.timestamp.batch)} has no loss-generating token on any rank (every label is "
            "-100), and the Trainer weights microbatches by loss-generating tokens (accumulate_train_batch_on_tokens="
            "True), so Composer would divide by zero. Drop rows without a response label in the data (check the "
            "collator's labels), or weight by samples (accumulate_train_batch_on_tokens=False), where such a batch "
            "trains nothing and is counted in remask/batches_without_labels.")

    def _model_inputs(self, microbatch: Mapping[str, Any]) -> dict[str, Any]:
        """The forward's input in the layout chosen at INIT (stacked for a microbatch that cannot share)."""
        inputs, self._shared_rows, why_stacked = model_inputs(
            microbatch, self.layout, self._shares_prefix, self._mask_dtype,
            forced=self.forward_layout == FORWARD_LAYOUT_SHARED, model_takes=self._model_takes)
        if why_stacked is not None and not self._warned_stacked_batch:
            self._warned_stacked_batch = True
            log.info("ReMask: microbatches run in the stacked layout: %s.", why_stacked)
        return inputs

    # ------------------------------------------------------------------------------- AFTER_FORWARD

    def _composer_weight(self, microbatch: Mapping[str, Any]) -> float:
        """The weight Composer gives this microbatch's loss: declared, or read from the Trainer (``auto``)."""
        if self.loss_weighting == "auto":
            weight = composer_microbatch_weight()
            if weight is not None:
                return weight
            if not self._warned_fallback:
                self._warned_fallback = True
                warnings.warn("ReMask(loss_weighting='auto') cannot read the Trainer's microbatch weight here; it "
                              "assumes Composer's sample weighting (checked on the first microbatch outside amp_fp16). "
                              "Declare loss_weighting='samples' or 'tokens' to silence this.", stacklevel=2)
        declared = "samples" if self.loss_weighting == "auto" else self.loss_weighting
        return declared_microbatch_weight(declared, microbatch, self._counts, dist.get_world_size())

    def _check_forward_inputs(self, state: State, rows: int) -> None:
        """What the model ran on must be the input ReMask built (edits after ReMask's BEFORE_FORWARD)."""
        self._input_check.remove()
        inputs, self._inputs = self._inputs, None
        seen = state.batch
        changed = seen is not inputs[0] or any(
            seen.get(key) is not tensor or tensor._version != version for key, (tensor, version) in inputs[1].items())
        out_rows = output_logits(state.outputs).shape[0]
        expected_rows = self._shared_rows.rows if self._shared_rows is not None \
            else rows * forward_passes(self._full_batch or {})
        if changed or out_rows != expected_rows:
            raise self._inputs_changed_error()

    def _check_inputs_as_the_model_starts(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        """Forward pre-hook: a later edit is named before the model runs on it (the shared-prefix input's
        4D mask no longer matches a truncated batch, and the model would fail on its own terms)."""
        self._input_check.remove()
        if self._inputs is None:
            return
        built = self._inputs[1]
        for key, value in kwargs.items():
            if not isinstance(value, torch.Tensor):
                continue
            if key not in built:
                raise self._inputs_changed_error()
            tensor, version = built[key]
            # A wrapper's mixed-precision cast of a floating input (FSDP2 casts the attention mask) is a new
            # tensor of the same shape and another float dtype: not an edit.
            cast = value.shape == tensor.shape and value.dtype != tensor.dtype and value.is_floating_point() \
                and tensor.is_floating_point()
            if not cast and (value is not tensor or value._version != version):
                raise self._inputs_changed_error()

    @staticmethod
    def _inputs_changed_error() -> RuntimeError:
        return RuntimeError(
            "ReMask: the model's input was changed after ReMask built it at Event.BEFORE_FORWARD, so its "
            "loss would not be exact: an algorithm listed after ReMask or a callback edits the batch at "
            "BEFORE_FORWARD. Edit batches at Event.AFTER_DATALOADER instead; any list order works there.")

    def _compute_loss(self, state: State) -> None:
        assert self._full_batch is not None and self._inputs is not None
        rows = int(self._full_batch["labels"].shape[0])
        self._check_forward_inputs(state, rows)
        full, self._full_batch = self._full_batch, None
        labels = full["labels"]
        batch_idx, pos_idx, targets, div_rows = predicted_positions(
            labels, full[DIVERGENCE_MASK_KEY] if self.two_pass else None)
        scales = microbatch_scales(self._counts, self._composer_weight(full), dist.get_world_size())
        if scales.composer_weight <= 0 and targets.numel() > 0:
            raise ValueError(
                f"ReMask: Composer gives this microbatch weight 0 (its DataSpec counts no loss-generating tokens) but it "
                f"holds {targets.numel()} predicted positions, which would silently not train; count loss-generating "
                "tokens with composer_remask.batch.batch_loss_tokens, or use sample weighting.")

        model_logits = output_logits(state.outputs)
        captured = None
        if self._impl == "hidden":
            captured = self._capture.take()
            self._capture.check_head_matches_logits(captured, model_logits)
        shared, self._shared_rows = self._shared_rows, None
        loss_rows = gather_loss_rows(model_logits, captured, rows, labels.shape[1], batch_idx, pos_idx,
                                     self.two_pass, want_metric_logits=bool(state.train_metrics),
                                     shared_index=None if shared is None else (shared.full_index, shared.masked_index))
        with get_precision_context(state.precision, state.precision_config):
            loss = microbatch_loss(loss_rows, targets, div_rows, scales, self.options, self.chunk_rows)
        if self._impl == "hidden":
            # Route backward through the model's own output as well (its value is unchanged): FSDP
            # hooks the root module's outputs to start its backward bookkeeping there.
            loss["total"] = loss["total"] + 0.0 * model_logits.float().sum()
        self._loss = loss
        self._probe.arm(loss["total"], scales.composer_weight, scaled_copy=not loss_scaled_in_place(state.precision))
        state.outputs = CausalLMOutputWithPast(loss=loss["total"], logits=loss_rows.metric_logits)
        state.batch = full

    # ------------------------------------------------------------------------------ safety nets

    def _check_weighting(self) -> None:
        measured = self._probe.applied_weight()
        if measured is None or WeightingProbe.matches(*measured):
            return
        applied, expected = measured
        if self.loss_weighting == "auto":
            cause = ("something between Event.AFTER_LOSS and backward rescaled the loss, or this Composer version "
                     "does not expose its microbatch weight; declare it with loss_weighting='samples' or 'tokens'")
        else:
            cause = (f"ReMask(loss_weighting={self.loss_weighting!r}) does not match how the Trainer weights "
                     "microbatches; use loss_weighting='auto' (the default), which reads it from the Trainer")
        raise ValueError(f"ReMask: Composer weighted a microbatch by {applied:.6g}, the loss assumed {expected:.6g}: "
                         f"{cause}.")

    def _check_every_row_trained(self) -> None:
        if self._trained_rows != self._prepared_rows:
            raise RuntimeError(
                f"ReMask: the Trainer trained {self._trained_rows} rows of a batch ReMask prepared with "
                f"{self._prepared_rows} (Event.BATCH_START); something added or dropped rows after that, so the "
                "token means were not exact. Edit batches at Event.AFTER_DATALOADER instead.")
