"""The Composer wrapper for a Hugging Face causal LM (FSDP policies, meta-device init, an MFU estimate)
and the factory that builds it from the recipe's ``model`` section (``hf_causal_lm``)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
from composer.models import HuggingFaceModel
from composer.utils import dist
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.integrations.accelerate import init_empty_weights
from transformers.modeling_utils import no_init_weights

from composer_remask.train.config import ConfigError

log = logging.getLogger(__name__)

__all__ = ["INIT_DEVICES", "ComposerCausalLM", "DecoderLayerPolicy", "MetaParamInit", "causal_lm_on_meta",
           "decoder_layer_class_names", "hf_causal_lm"]


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
    - ``flops_per_batch`` counts one pass over the batch; ReMask multiplies it, for its fit, by the
      passes its layout runs (two whole passes, or the full rows plus the masked suffixes).
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

    def flops_per_batch(self, batch: Mapping[str, Any]) -> float:
        """Training FLOPs of one pass: (6 N + 12 L d T) per token (PaLM, appendix B) times tokens."""
        rows, seq_len = batch["input_ids"].shape[:2]
        per_token = 6 * self.num_parameters + 12 * self.num_layers * self.hidden_size * seq_len
        return float(per_token * rows * seq_len)


# ---------------------------------------------------------------------------- the model factory

# model.init_device: "mixed" = each node's first rank loads the weights, the others build on meta.
INIT_DEVICES = ("cpu", "meta", "mixed")


def hf_causal_lm(
    tokenizer: PreTrainedTokenizerBase,
    init_device: str = "cpu",
    *,
    pretrained_model_name_or_path: str | None = None,
    pretrained: bool = True,
    config: dict[str, Any] | None = None,
    config_overrides: dict[str, Any] | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    train_metrics: bool = True,
    pad_vocab_to_multiple_of: int = 64,
) -> ComposerCausalLM:
    """A Hugging Face causal LM wrapped for Composer (YAML ``model: {name: hf_causal_lm, ...}``).

    - ``pretrained: true``: weights from ``pretrained_model_name_or_path`` (hub id or folder),
      the path of the real recipes (``stabilityai/stablelm-3b-4e1t``);
    - ``pretrained: false``: random weights from a config, either the named model's config or
      ``config: {model_type: stablelm, hidden_size: ..., ...}`` written out in the YAML;
    - ``config_overrides``: changes applied to the config in both cases (must be existing keys).

    The embeddings grow (to a multiple of ``pad_vocab_to_multiple_of``) when the tokenizer with
    ReMask's special tokens is larger than the vocabulary. ``init_device='meta'`` builds the
    architecture without allocating weights (for inspecting a recipe; it cannot train).
    ``init_device='mixed'`` (models past one GPU's memory, with FSDP): each node's first rank
    loads (or initializes) the weights on the CPU, the other ranks build the architecture on the
    meta device, and FSDP (``sync_module_states``, set by ``train/transforms.py``) broadcasts rank 0's weights
    while it shards them: one copy in CPU memory per node instead of one per GPU.
    """
    hf_config = _hf_config(pretrained_model_name_or_path, config, trust_remote_code)
    for key, value in (config_overrides or {}).items():
        if not hasattr(hf_config, key):
            raise ConfigError(f"model.config_overrides.{key}: {type(hf_config).__name__} has no such key")
        setattr(hf_config, key, value)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if pretrained:
        if pretrained_model_name_or_path is None or config is not None:
            raise ConfigError("model: pretrained: true loads weights from pretrained_model_name_or_path "
                              "(and takes no `config`); set pretrained: false for random weights")
        if init_device == "meta":
            raise ConfigError("model: init_device 'meta' cannot load pretrained weights")
    if init_device == "mixed" and dist.get_local_rank() != 0:
        model = causal_lm_on_meta(hf_config, trust_remote_code=trust_remote_code, **extra)
    elif pretrained:
        model = AutoModelForCausalLM.from_pretrained(
            pretrained_model_name_or_path, config=hf_config, trust_remote_code=trust_remote_code, **extra)
    else:
        with torch.device("cpu" if init_device == "mixed" else init_device):
            model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code, **extra)
    _fit_embeddings(model, tokenizer, pad_vocab_to_multiple_of)
    model.config.use_cache = False  # no KV cache while training (the export turns it back on)
    return ComposerCausalLM(model, tokenizer, train_metrics=train_metrics)


def _hf_config(name_or_path: str | None, config: dict[str, Any] | None, trust_remote_code: bool) -> Any:
    if config is not None:
        config = dict(config)
        model_type = config.pop("model_type", None)
        if model_type is None:
            raise ConfigError("model.config.model_type: missing required value (e.g. stablelm, llama)")
        try:
            return AutoConfig.for_model(model_type, **config)
        except ValueError as error:
            raise ConfigError(f"model.config.model_type: {error}") from error
    if name_or_path is None:
        raise ConfigError("model: set pretrained_model_name_or_path, or `config` with a model_type")
    return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)


def _fit_embeddings(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, multiple: int) -> None:
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        # On meta (init_device: mixed) only the shape matters: FSDP copies rank 0's values in.
        on_meta = model.get_input_embeddings().weight.is_meta
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=multiple, mean_resizing=not on_meta)
        log.info("resized the embeddings from %d to %d rows for the tokenizer's %d tokens",
                 rows, model.get_input_embeddings().num_embeddings, len(tokenizer))
