"""The Composer wrapper for a Hugging Face causal LM, with FSDP policies, meta-device init and an MFU estimate."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
from composer.models import HuggingFaceModel
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.integrations.accelerate import init_empty_weights
from transformers.modeling_utils import no_init_weights

from composer_remask.batch import forward_passes

__all__ = ["ComposerCausalLM", "DecoderLayerPolicy", "MetaParamInit", "causal_lm_on_meta",
           "decoder_layer_class_names"]


class DecoderLayerPolicy:
    """True for the model's decoder layers (a picklable FSDP wrap / activation-checkpointing policy)."""

    def __init__(self, class_names: Iterable[str]) -> None:
        self.class_names = frozenset(class_names)

    def __call__(self, module: torch.nn.Module) -> bool:
        return type(module).__name__ in self.class_names

    def __repr__(self) -> str:
        return f"DecoderLayerPolicy({sorted(self.class_names)})"


class MetaParamInit:
    """FSDP's ``param_init_fn`` for a model whose parameters were built on the meta device.

    Composer's FSDP moves each module's meta tensors to the GPU (``to_empty``) and then calls the
    wrapped model's ``param_init_fn(module)``. This gives them the model's own initial values, so
    nothing is left as uninitialized memory; with ``sync_module_states: true`` FSDP then
    broadcasts the loaded weights of rank 0 over them.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model

    def __call__(self, module: torch.nn.Module) -> None:
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
        self.model._init_weights(module)

    def __repr__(self) -> str:
        return f"MetaParamInit({type(self.model).__name__})"


def causal_lm_on_meta(config: PretrainedConfig, **kwargs: Any) -> PreTrainedModel:
    """The architecture with every parameter on the meta device and buffers (rotary tables) real.

    The ranks other than each node's first build this under ``init_device: mixed``: no memory and
    no init time for the weights, which FSDP fills from rank 0. Buffers stay on the CPU because
    FSDP's sync broadcasts them but nothing re-creates computed ones such as ``inv_freq``.
    """
    with no_init_weights(), init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return model


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
    - meta-device parameters (``init_device: mixed``): Composer calls the wrapped module's
      ``param_init_fn`` after moving each meta module to the GPU (:class:`MetaParamInit`);
    - ``flops_per_batch`` counts the passes that ran: two on a batch ReMask prepared with a masked
      pass, one otherwise.
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
        model.param_init_fn = MetaParamInit(model)

    # ReMask multiplies by the passes it runs only for models that do not count them themselves.
    flops_count_remask_passes = True

    def flops_per_batch(self, batch: Mapping[str, Any]) -> float:
        """Training FLOPs: (6 N + 12 L d T) per token (PaLM, appendix B) times tokens, per pass run.

        A batch ReMask prepared with a masked pass runs two passes (``forward_passes``).
        """
        rows, seq_len = batch["input_ids"].shape[:2]
        per_token = 6 * self.num_parameters + 12 * self.num_layers * self.hidden_size * seq_len
        return float(per_token * rows * seq_len * forward_passes(batch))
