"""The Composer wrapper for a Hugging Face causal LM, with FSDP policies and an MFU estimate."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
from composer.models import HuggingFaceModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["ComposerCausalLM", "DecoderLayerPolicy", "decoder_layer_class_names"]


class DecoderLayerPolicy:
    """True for the model's decoder layers (a picklable FSDP wrap / activation-checkpointing policy)."""

    def __init__(self, class_names: Iterable[str]) -> None:
        self.class_names = frozenset(class_names)

    def __call__(self, module: torch.nn.Module) -> bool:
        return type(module).__name__ in self.class_names

    def __repr__(self) -> str:
        return f"DecoderLayerPolicy({sorted(self.class_names)})"


def decoder_layer_class_names(model: PreTrainedModel) -> list[str]:
    """The decoder layer classes: Hugging Face's ``_no_split_modules``, else the longest ModuleList's items."""
    names = list(getattr(model, "_no_split_modules", None) or [])
    if names:
        return names
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} to wrap for FSDP")
    return sorted({type(layer).__name__ for layer in max(lists, key=len)})


class ComposerCausalLM(HuggingFaceModel):
    """``HuggingFaceModel`` for a causal LM, ready for ReMask, FSDP and Composer's SpeedMonitor.

    - train / eval metrics: ``LanguageCrossEntropy`` and ``LanguagePerplexity`` (from logits, so
      ``use_logits=True``);
    - FSDP: Composer looks for ``fsdp_wrap_fn`` and ``activation_checkpointing_fn`` on the module
      it wraps (``self.model``); both are set to "is a decoder layer", so each layer is its own
      FSDP unit and checkpointing boundary, while the embeddings, final norm and ``lm_head`` stay
      in the root unit (ReMask runs ``lm_head`` on the hidden states after forward);
    - ``flops_per_batch`` counts ONE forward+backward pass (ReMask doubles it itself).
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None,
                 train_metrics: bool = True) -> None:
        super().__init__(
            model,
            tokenizer=tokenizer,
            use_logits=True,
            metrics=[LanguageCrossEntropy(), LanguagePerplexity()] if train_metrics else None,
            eval_metrics=[LanguageCrossEntropy(), LanguagePerplexity()],
            shift_labels=True,
        )
        # Counted now: after FSDP sharding, parameters are per-rank shards.
        self.num_parameters = sum(p.numel() for p in model.parameters())
        config = model.config
        self.num_layers = int(config.num_hidden_layers)
        self.hidden_size = int(config.hidden_size)
        policy = DecoderLayerPolicy(decoder_layer_class_names(model))
        model.fsdp_wrap_fn = policy
        model.activation_checkpointing_fn = policy

    def flops_per_batch(self, batch: Mapping[str, Any]) -> float:
        """Training FLOPs of one pass: (6 N + 12 L d T) per token (PaLM, appendix B) times tokens."""
        rows, seq_len = batch["input_ids"].shape[:2]
        per_token = 6 * self.num_parameters + 12 * self.num_layers * self.hidden_size * seq_len
        return float(per_token * rows * seq_len)
