"""ReMask as a Composer algorithm: mask, run both sequences in one forward, assemble the loss.

Event by event (DESIGN §2, REFERENCE "Events inside one training batch"):

* ``AFTER_DATALOADER`` (whole device batch, on the CPU): apply the ReMask-CoT label rules, draw
  the input masks from (seed, batch index, global sample index, position), and count the global
  numbers of predicted tokens. Composer counts tokens for ``accumulate_train_batch_on_tokens`` just
  before this event and fixes each microbatch's loss weight later, so the label rules are applied
  to what Composer splits and the loss can undo Composer's per-microbatch weighting exactly.
* ``BEFORE_FORWARD`` (one microbatch, on the device): replace the batch by ``[full; masked]``, so
  each pair stays in one microbatch and the model runs once (one FSDP all-gather).
* ``AFTER_FORWARD``: compute the loss from the final hidden states, chunk by chunk through the
  output layer, at predicted positions only; put back the full half of the batch and outputs so
  Composer's train metrics measure the full sequence.
* ``AFTER_LOSS``: ``state.loss`` becomes ``{total, ce_full, ce_masked, divergence}``.

The loss of a batch is the token mean over the whole global batch, whatever the microbatch size
or the number of ranks: each microbatch's terms are scaled so that Composer's weighting
(samples, or loss-generating tokens) sums them to exactly that mean.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from typing import Any

import torch
from composer.core import Algorithm, Event, State, TimeUnit
from composer.core.precision import get_precision_context
from composer.loggers import Logger
from composer.utils import dist
from transformers.modeling_outputs import CausalLMOutputWithPast

from composer_remask.batch import (
    DIVERGENCE_MASK_KEY,
    MASK_TOKEN,
    TOKEN_ROLES_KEY,
    batch_loss_tokens,
    num_loss_tokens,
)
from composer_remask.divergence import DIVERGENCES, predicted_positions, remask_loss_from_rows
from composer_remask.masking import MASK_STRATEGIES, remask_batch

log = logging.getLogger(__name__)

MASKED_INPUT_IDS_KEY = "remask_masked_input_ids"
_PRIVATE_KEYS = (MASKED_INPUT_IDS_KEY, DIVERGENCE_MASK_KEY)
LOSS_WEIGHTINGS = ("samples", "tokens")
LOSS_IMPLS = ("auto", "hidden", "logits")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def _output_logits(outputs: Any) -> torch.Tensor:
    return outputs["logits"] if isinstance(outputs, Mapping) else outputs.logits


class ReMask(Algorithm):
    """Regularized masking (ReMask / ReMask-CoT) for causal LM fine-tuning.

    The loss is ``0.5 * (CE_masked + CE_full) + weight * D(p_masked, p_full)``, where the masked
    sequence has each response/rationale input token replaced with probability ``mask_prob``.

    Args:
        mask_prob: probability of replacing each maskable input token (card: 0.4). ``0`` is plain
            SFT: no second pass at all.
        weight: weight of the divergence (card: 0.1). ``0`` is Masked Thought.
        divergence: ``sym_kl`` (mean of forward and backward KL), ``forward_kl``, ``reverse_kl``,
            ``js`` or ``mse`` (on log-probabilities).
        mask_strategy: ``mask_token`` (the tokenizer's ``<|mask|>``), ``random`` (uniform over the
            vocabulary, never a special token) or ``pad``.
        mask_token_id: id of the mask token; ``None`` looks up ``<|mask|>`` in the model's tokenizer.
        rationale_label_drop_prob: per-token probability of dropping a rationale label (card 0.1).
        answer_only_prob: per-example probability of dropping every rationale label (card 0.1).
        mask_prob_warmup: fraction of training over which ``mask_prob`` ramps linearly from 0.
        detach_full: stop the divergence's gradient through the full pass (teacher-style).
        seed: seed of the masks; ``None`` uses the trainer's ``rank_zero_seed``. Saved in
            checkpoints, so a resumed run draws the same masks.
        loss_weighting: how the Trainer weights microbatches: ``samples`` (Composer's default) or
            ``tokens`` (``accumulate_train_batch_on_tokens=True`` with a DataSpec whose
            ``loss_generating`` count is ``composer_remask.batch.batch_loss_tokens``, as the
            project's loaders do). A mismatch is detected on the first microbatch and raised.
        loss_impl: ``hidden`` computes logits chunk by chunk from the final hidden states (lean),
            ``logits`` uses the model's logits; ``auto`` picks ``hidden`` when the model allows it.

    Example::

        from composer import Trainer
        from composer_remask import ReMask

        trainer = Trainer(model=hf_model, train_dataloader=loader, max_duration="1ep",
                          algorithms=[ReMask(mask_prob=0.4, weight=0.1)])
        trainer.fit()
    """

    def __init__(
        self,
        mask_prob: float = 0.4,
        weight: float = 0.1,
        divergence: str = "sym_kl",
        mask_strategy: str = "mask_token",
        mask_token_id: int | None = None,
        rationale_label_drop_prob: float = 0.1,
        answer_only_prob: float = 0.1,
        mask_prob_warmup: float = 0.0,
        detach_full: bool = False,
        seed: int | None = None,
        loss_weighting: str = "samples",
        loss_impl: str = "auto",
        chunk_rows: int | None = None,
    ) -> None:
        for name, value in (("mask_prob", mask_prob), ("rationale_label_drop_prob", rationale_label_drop_prob),
                            ("answer_only_prob", answer_only_prob), ("mask_prob_warmup", mask_prob_warmup)):
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"ReMask: {name} must be in [0, 1], got {value!r}")
        if weight < 0:
            raise ValueError(f"ReMask: weight must be >= 0, got {weight!r}")
        for name, value, allowed in (("divergence", divergence, DIVERGENCES),
                                     ("mask_strategy", mask_strategy, MASK_STRATEGIES),
                                     ("loss_weighting", loss_weighting, LOSS_WEIGHTINGS),
                                     ("loss_impl", loss_impl, LOSS_IMPLS)):
            if value not in allowed:
                raise ValueError(f"ReMask: unknown {name} {value!r}; choose one of {allowed}")
        self.mask_prob = float(mask_prob)
        self.weight = float(weight)
        self.divergence = divergence
        self.mask_strategy = mask_strategy
        self.mask_token_id = mask_token_id
        self.rationale_label_drop_prob = float(rationale_label_drop_prob)
        self.answer_only_prob = float(answer_only_prob)
        self.mask_prob_warmup = float(mask_prob_warmup)
        self.detach_full = bool(detach_full)
        self.seed = seed
        self.loss_weighting = loss_weighting
        self.loss_impl = loss_impl
        self.chunk_rows = chunk_rows

        self._composer_model: torch.nn.Module | None = None
        self._pad_token_id: int | None = None
        self._protected_ids: torch.Tensor | None = None
        self._random_candidates: torch.Tensor | None = None
        self._impl = "logits"
        # Per batch: global totals (unit used by Composer, CE tokens, divergence tokens).
        self._global_counts: tuple[float, float, float] = (0.0, 0.0, 0.0)
        # Per microbatch.
        self._full_batch: dict[str, Any] | None = None
        self._hidden: torch.Tensor | None = None
        self._hook: list | None = None
        self._head: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._head_checked = False
        self._loss: dict[str, torch.Tensor] | None = None
        self._loss_weight_probe: tuple[torch.Tensor, float, float] | None = None
        self._weighting_checked = False

    @property
    def two_pass(self) -> bool:
        """Whether a masked second pass runs at all (``mask_prob == 0`` is plain SFT)."""
        return self.mask_prob > 0

    # ----------------------------------------------------------------------------- Composer hooks

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.INIT, Event.AFTER_DATALOADER, Event.BEFORE_FORWARD, Event.AFTER_FORWARD,
                         Event.AFTER_LOSS) or (event == Event.AFTER_BACKWARD and self._loss_weight_probe is not None)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self._init(state)
        elif event == Event.AFTER_DATALOADER:
            self._prepare_batch(state, logger)
        elif event == Event.BEFORE_FORWARD:
            self._double_batch(state)
        elif event == Event.AFTER_FORWARD:
            self._compute_loss(state)
        elif event == Event.AFTER_LOSS:
            assert self._loss is not None
            state.loss = self._loss
            self._loss = None
        elif event == Event.AFTER_BACKWARD:
            self._check_loss_weighting()

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed") is not None:
            self.seed = int(state["seed"])

    # ------------------------------------------------------------------------------------- INIT

    def _init(self, state: State) -> None:
        model = _unwrap(state.model)
        self._composer_model = model
        if self.seed is None:
            self.seed = int(state.rank_zero_seed)
        hf_model = getattr(model, "model", None)
        tokenizer = getattr(model, "tokenizer", None)
        vocab_rows = self._embedding_rows(hf_model)

        special_ids: list[int] = []
        if tokenizer is not None:
            special_ids = sorted(set(int(i) for i in tokenizer.all_special_ids))
            self._pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
                else tokenizer.eos_token_id
        if self.mask_strategy == "mask_token" and self.two_pass:
            self.mask_token_id = self._resolve_mask_token(tokenizer, vocab_rows)
        if self.mask_token_id is not None:
            special_ids = sorted(set(special_ids) | {int(self.mask_token_id)})
        self._protected_ids = torch.tensor(special_ids, dtype=torch.long)
        if self.mask_strategy == "pad" and self.two_pass and self._pad_token_id is None:
            raise ValueError("ReMask(mask_strategy='pad') needs a tokenizer with a pad or EOS token on the model "
                             "(HuggingFaceModel(tokenizer=...)).")
        if self.mask_strategy == "random" and self.two_pass:
            size = len(tokenizer) if tokenizer is not None else vocab_rows
            if size is None:
                raise ValueError("ReMask(mask_strategy='random') needs a tokenizer or a model config with vocab_size.")
            if vocab_rows is not None:
                size = min(size, vocab_rows)
            candidates = torch.arange(size)
            self._random_candidates = candidates[~torch.isin(candidates, self._protected_ids)]

        self._impl = self._choose_impl(hf_model)
        if self.two_pass and hasattr(model, "flops_per_batch") and not getattr(model, "_remask_counts_two", False):
            one_pass = model.flops_per_batch
            model.flops_per_batch = lambda batch: 2 * one_pass(batch)  # both passes do the work
            model._remask_counts_two = True

    @staticmethod
    def _embedding_rows(hf_model: Any) -> int | None:
        if hf_model is not None and hasattr(hf_model, "get_input_embeddings"):
            emb = hf_model.get_input_embeddings()
            if emb is not None and hasattr(emb, "num_embeddings"):
                return int(emb.num_embeddings)
        config = getattr(hf_model, "config", None)
        return getattr(config, "vocab_size", None)

    def _resolve_mask_token(self, tokenizer: Any, vocab_rows: int | None) -> int:
        how = ("add it with composer_remask.data.tokenizer.add_remask_tokens(tokenizer) and "
               "model.resize_token_embeddings(len(tokenizer)), pass ReMask(mask_token_id=...), or choose "
               "mask_strategy='random' or 'pad'")
        mask_id = self.mask_token_id
        if mask_id is None:
            if tokenizer is None:
                raise ValueError(f"ReMask cannot find {MASK_TOKEN}: the model has no tokenizer "
                                 f"(HuggingFaceModel(tokenizer=...)); {how}.")
            if MASK_TOKEN not in tokenizer.get_vocab():
                raise ValueError(f"ReMask: the tokenizer has no {MASK_TOKEN} token; {how}.")
            mask_id = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
        if vocab_rows is not None and not 0 <= int(mask_id) < vocab_rows:
            raise ValueError(f"ReMask: mask token id {mask_id} is outside the model's {vocab_rows} embeddings; "
                             "resize the embeddings after adding the token (model.resize_token_embeddings).")
        return int(mask_id)

    def _choose_impl(self, hf_model: Any) -> str:
        forward_args = getattr(self._composer_model, "model_forward_args", None)
        if forward_args is None and hf_model is not None:
            forward_args = list(inspect.signature(hf_model.forward).parameters)
        config = getattr(hf_model, "config", None)
        transforms_logits = any(getattr(config, name, None) not in (None, 1, 1.0, 0, 0.0) for name in
                                ("logits_scaling", "final_logit_softcapping", "logit_scale", "output_multiplier_scale"))
        possible = (
            hf_model is not None
            and callable(getattr(hf_model, "get_output_embeddings", None))
            and callable(getattr(hf_model, "get_decoder", None))
            and isinstance(hf_model.get_output_embeddings(), torch.nn.Linear)
            and "logits_to_keep" in (forward_args or ())
            and not transforms_logits
        )
        if self.loss_impl == "hidden" and not possible:
            raise ValueError("ReMask(loss_impl='hidden') needs a Hugging Face causal LM with get_decoder(), a linear "
                             "output layer and a `logits_to_keep` forward argument; use loss_impl='logits'.")
        if self.loss_impl == "logits" or not possible:
            return "logits"
        return "hidden"

    def _check_head_matches_logits(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                   logits: torch.Tensor) -> None:
        """Once: the output layer applied to the hidden states must give the model's own logits.

        Models that rescale or soft-cap their logits after the output layer (Granite, Gemma 2,
        Cohere, ...) would otherwise train on a different distribution than they predict with.
        """
        with torch.no_grad():
            mine = torch.nn.functional.linear(hidden[:, -1:].to(weight.dtype), weight, bias).float()
            theirs = logits[:, -1:].float()
            if mine.shape != theirs.shape or not torch.allclose(mine, theirs, rtol=1e-2, atol=1e-2):
                raise ValueError(
                    "ReMask(loss_impl='hidden'): the model transforms the output layer's logits (scaling or "
                    "soft-capping), so they cannot be recomputed from the hidden states; use "
                    "ReMask(loss_impl='logits').")
        self._head_checked = True

    def _check_loss_weighting(self) -> None:
        total, before, expected = self._loss_weight_probe
        self._loss_weight_probe = None
        after = float(total.detach())
        if before == 0.0:  # nothing to compare yet
            return
        self._weighting_checked = True
        applied = after / before
        if applied == 1.0 and expected != 1.0:  # a grad scaler scaled a copy: cannot tell
            return
        if abs(applied - expected) > 1e-4 * max(1.0, abs(expected)):
            other = "tokens" if self.loss_weighting == "samples" else "samples"
            raise ValueError(
                f"ReMask(loss_weighting={self.loss_weighting!r}) does not match how the Trainer weights "
                f"microbatches (weight {applied:.6g}, expected {expected:.6g}). With "
                "accumulate_train_batch_on_tokens=True and a DataSpec that counts loss-generating tokens "
                "(composer_remask.batch.batch_loss_tokens) use loss_weighting='tokens'; with Composer's default "
                f"sample weighting use 'samples' (try loss_weighting={other!r}).")

    # ---------------------------------------------------------------------------- AFTER_DATALOADER

    def current_mask_prob(self, state: State) -> float:
        """``mask_prob``, ramped linearly over the first ``mask_prob_warmup`` of training."""
        if self.mask_prob_warmup <= 0:
            return self.mask_prob
        max_duration = state.max_duration
        if max_duration is not None and max_duration.unit == TimeUnit.EPOCH and state.dataloader_len is not None:
            # Epoch durations advance once per epoch; count batches so the ramp is linear.
            total = int(state.dataloader_len) * int(max_duration.value)
            elapsed = int(state.timestamp.batch) / total if total > 0 else 1.0
        else:
            fraction = state.get_elapsed_duration()
            if fraction is None:
                return self.mask_prob
            elapsed = float(fraction.value)
        return self.mask_prob * min(1.0, elapsed / self.mask_prob_warmup)

    def _prepare_batch(self, state: State, logger: Logger) -> None:
        batch = state.batch
        if not isinstance(batch, Mapping) or "input_ids" not in batch or "labels" not in batch:
            keys = list(batch.keys()) if isinstance(batch, Mapping) else type(batch).__name__
            raise ValueError(f"ReMask needs dict batches with 'input_ids' and 'labels' (unshifted, -100 where "
                             f"nothing is predicted); got {keys}.")
        input_ids, labels = batch["input_ids"], batch["labels"]
        rows = int(input_ids.shape[0])
        offset = self._rank_offset(state, rows)
        mask_prob = self.current_mask_prob(state)
        masked = remask_batch(
            input_ids, labels, batch.get(TOKEN_ROLES_KEY), batch.get("attention_mask"),
            mask_prob=mask_prob if self.two_pass else 0.0,
            mask_strategy=self.mask_strategy, mask_token_id=self.mask_token_id, pad_token_id=self._pad_token_id,
            random_candidates=self._random_candidates, protected_token_ids=self._protected_ids,
            rationale_label_drop_prob=self.rationale_label_drop_prob, answer_only_prob=self.answer_only_prob,
            seed=int(self.seed or 0), batch_index=int(state.timestamp.batch),
            sample_indices=range(offset, offset + rows),
        )
        batch = dict(batch)
        batch["labels"] = masked.labels
        batch[DIVERGENCE_MASK_KEY] = masked.divergence_mask
        if self.two_pass:
            batch[MASKED_INPUT_IDS_KEY] = masked.masked_input_ids
        state.batch = batch

        n_ce = num_loss_tokens(masked.labels)
        n_div = int(masked.divergence_mask[:, 1:].sum())
        unit = rows if self.loss_weighting == "samples" else batch_loss_tokens(batch)
        counts = torch.tensor([unit, n_ce, n_div, int(masked.input_mask.sum()), int(masked.maskable.sum())],
                              dtype=torch.float64)
        if dist.get_world_size() > 1:
            counts = state.device.tensor_to_device(counts)
            dist.all_reduce(counts, reduce_operation="SUM")
            counts = counts.cpu()
        self._global_counts = (float(counts[0]), float(counts[1]), float(counts[2]))
        if self.two_pass:
            maskable = float(counts[4])
            logger.log_metrics({
                "remask/mask_prob": mask_prob,
                "remask/mask_fraction": float(counts[3]) / maskable if maskable else 0.0,
            })

    @staticmethod
    def _rank_offset(state: State, rows: int) -> int:
        """Index of this rank's first sample in the global batch (ranks hold contiguous blocks)."""
        if dist.get_world_size() == 1:
            return 0
        sizes = dist.all_gather(state.device.tensor_to_device(torch.tensor([rows], dtype=torch.long)))
        return int(sum(int(s.item()) for s in sizes[: dist.get_global_rank()]))

    # ------------------------------------------------------------------------------ BEFORE_FORWARD

    def _double_batch(self, state: State) -> None:
        batch = state.batch
        if not isinstance(batch, Mapping) or DIVERGENCE_MASK_KEY not in batch:
            raise RuntimeError("ReMask: the microbatch lost ReMask's keys between AFTER_DATALOADER and "
                               "BEFORE_FORWARD; is another algorithm rebuilding the batch?")
        self._full_batch = dict(batch)
        rows = int(batch["input_ids"].shape[0])
        forward_batch: dict[str, Any] = {}
        for key, value in batch.items():
            if key in _PRIVATE_KEYS or key == "labels" or key == TOKEN_ROLES_KEY:
                continue
            if self.two_pass and isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows:
                second = batch[MASKED_INPUT_IDS_KEY] if key == "input_ids" else value
                value = torch.cat([value, second.to(value.device)], dim=0)
            forward_batch[key] = value
        if self._impl == "hidden":
            forward_batch["logits_to_keep"] = 1
            self._remove_hooks()  # left by a forward that never finished (e.g. an OOM retried by Composer)
            hf_model = self._hf_model()
            # Capture the final hidden states and the output layer's weight as the forward sees
            # them: under FSDP with use_orig_params the module attribute is a flat shard afterwards.
            self._hook = [hf_model.get_decoder().register_forward_hook(self._capture_hidden),
                          hf_model.get_output_embeddings().register_forward_pre_hook(self._capture_head)]
        state.batch = forward_batch

    def _hf_model(self) -> Any:
        assert self._composer_model is not None, "ReMask was not initialized (Event.INIT)"
        return self._composer_model.model

    def _capture_hidden(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        hidden = getattr(output, "last_hidden_state", None)
        self._hidden = hidden if hidden is not None else output[0]

    def _capture_head(self, module: torch.nn.Module, args: Any) -> None:
        self._head = (module.weight, module.bias)

    def _remove_hooks(self) -> None:
        for hook in self._hook or ():
            hook.remove()
        self._hook = None

    # ------------------------------------------------------------------------------- AFTER_FORWARD

    def _compute_loss(self, state: State) -> None:
        full = self._full_batch
        assert full is not None
        self._remove_hooks()
        labels = full["labels"]
        rows = int(labels.shape[0])
        batch_idx, pos_idx, targets, div_rows = predicted_positions(
            labels, full[DIVERGENCE_MASK_KEY] if self.two_pass else None)

        unit_total, n_ce, n_div = self._global_counts
        unit_mb = rows if self.loss_weighting == "samples" else batch_loss_tokens(full)
        # Composer multiplies this microbatch's loss by unit_mb / mean-rank-units and DDP averages the
        # ranks, so the sums are scaled by unit_total / unit_mb to land on the global token mean.
        factor = unit_total / unit_mb if unit_mb > 0 else 0.0
        ce_scale = factor / n_ce if n_ce > 0 else 0.0
        div_scale = factor / n_div if n_div > 0 else 0.0

        want_metric_logits = bool(state.train_metrics)
        metric_logits = None
        on_full_logits = None
        if self._impl == "hidden":
            hidden, self._hidden = self._hidden, None
            if hidden is None:
                raise RuntimeError("ReMask: the decoder's hidden states were not captured during forward.")
            weight, bias = self._head
            self._head = None
            if not self._head_checked:
                self._check_head_matches_logits(hidden, weight, bias, _output_logits(state.outputs))
            rows_full = hidden[:rows][batch_idx, pos_idx]
            rows_masked = hidden[rows:][batch_idx, pos_idx] if self.two_pass else None
            if want_metric_logits:
                # Train metrics need (B, T, V) logits; filled at predicted positions only, in the dtype
                # the model's own logits have (bf16 under amp_bf16), like the logits SFT would keep.
                metric_logits = hidden.new_zeros((rows, labels.shape[1], weight.shape[0]),
                                                 dtype=_output_logits(state.outputs).dtype)

                def on_full_logits(start: int, end: int, chunk: torch.Tensor) -> None:
                    metric_logits[batch_idx[start:end], pos_idx[start:end]] = chunk.to(metric_logits.dtype)
        else:
            logits = _output_logits(state.outputs)
            rows_full = logits[:rows][batch_idx, pos_idx]
            rows_masked = logits[rows:][batch_idx, pos_idx] if self.two_pass else None
            weight = bias = None
            metric_logits = logits[:rows]

        with get_precision_context(state.precision, state.precision_config):
            total, sums = remask_loss_from_rows(
                rows_full, rows_masked, targets, div_rows, weight=self.weight, divergence=self.divergence,
                detach_full=self.detach_full, ce_scale=ce_scale, div_scale=div_scale, output_weight=weight,
                output_bias=bias, on_full_logits=on_full_logits, chunk_rows=self.chunk_rows)
        if self._impl == "hidden":
            # Route backward through the model's own output as well (its value is unchanged): FSDP
            # hooks the root module's outputs to start its backward bookkeeping there.
            total = total + 0.0 * _output_logits(state.outputs).float().sum()
        loss = {"total": total, "ce_full": sums[0] * ce_scale}
        if self.two_pass:
            loss["ce_masked"] = sums[1] * ce_scale
            loss["divergence"] = sums[2] * div_scale
        self._loss = loss
        if not self._weighting_checked and unit_mb > 0 and unit_total > 0:
            # Composer scales state.loss['total'] in place by its microbatch weight before backward;
            # the first time, compare that weight with the one this normalization assumes.
            expected = unit_mb / (unit_total / dist.get_world_size())
            self._loss_weight_probe = (total, float(total.detach()), expected)
        state.outputs = CausalLMOutputWithPast(loss=total, logits=metric_logits)
        state.batch = full
        self._full_batch = None

