"""The lean path: the loss from the final hidden states, without the model's full logits.

A Hugging Face causal LM is asked for the logits of its last position only (``logits_to_keep=1``)
while two hooks capture what the loss needs: the decoder's final hidden states and the output
layer's weight and bias *as the forward sees them* (under FSDP with ``use_orig_params`` the module
attribute is a flat shard once the forward is over). The loss then projects only the predicted
positions through the output layer, chunk by chunk.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

LOSS_IMPLS = ("auto", "hidden", "logits")

# Config attributes of models that rescale or soft-cap their logits after the output layer.
_LOGIT_TRANSFORMS = ("logits_scaling", "final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def output_logits(outputs: Any) -> torch.Tensor:
    """The logits of a model output (a Hugging Face output object or a mapping)."""
    return outputs["logits"] if isinstance(outputs, Mapping) else outputs.logits


def choose_loss_impl(loss_impl: str, hf_model: Any, forward_args: list[str] | None = None) -> str:
    """``hidden`` when requested or allowed (``auto``) and the model supports it, else ``logits``."""
    if forward_args is None and hf_model is not None:
        forward_args = list(inspect.signature(hf_model.forward).parameters)
    config = getattr(hf_model, "config", None)
    transforms_logits = any(getattr(config, name, None) not in (None, 1, 1.0, 0, 0.0) for name in _LOGIT_TRANSFORMS)
    possible = (
        hf_model is not None
        and callable(getattr(hf_model, "get_output_embeddings", None))
        and callable(getattr(hf_model, "get_decoder", None))
        and isinstance(hf_model.get_output_embeddings(), torch.nn.Linear)
        and "logits_to_keep" in (forward_args or ())
        and not transforms_logits
    )
    if loss_impl == "hidden" and not possible:
        raise ValueError("ReMask(loss_impl='hidden') needs a Hugging Face causal LM with get_decoder(), a linear "
                         "output layer and a `logits_to_keep` forward argument; use loss_impl='logits'.")
    return "hidden" if possible and loss_impl != "logits" else "logits"


@dataclass
class Captured:
    """What one forward left for the loss: final hidden states and the output layer's parameters."""

    hidden: torch.Tensor
    head_weight: torch.Tensor
    head_bias: torch.Tensor | None


class HiddenStateCapture:
    """Hooks that capture the final hidden states and the output layer for one forward pass."""

    def __init__(self) -> None:
        self._handles: list[Any] = []
        self._hidden: torch.Tensor | None = None
        self._head: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.head_checked = False

    def install(self, hf_model: Any) -> None:
        self.remove()  # left by a forward that never finished (e.g. an OOM retried by Composer)
        self._handles = [hf_model.get_decoder().register_forward_hook(self._on_decoder),
                         hf_model.get_output_embeddings().register_forward_pre_hook(self._on_head)]

    def remove(self) -> None:
        """Remove the hooks and drop anything captured (an interrupted forward's graph included)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._hidden = self._head = None

    def take(self) -> Captured:
        """Remove the hooks and hand over what the forward captured (once)."""
        hidden, head = self._hidden, self._head
        self.remove()
        if hidden is None or head is None:
            raise RuntimeError("ReMask: the decoder's hidden states were not captured during forward.")
        return Captured(hidden, head[0], head[1])

    def _on_decoder(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        hidden = getattr(output, "last_hidden_state", None)
        self._hidden = hidden if hidden is not None else output[0]

    def _on_head(self, module: torch.nn.Module, args: Any) -> None:
        self._head = (module.weight, module.bias)

    def check_head_matches_logits(self, captured: Captured, logits: torch.Tensor) -> None:
        """Once: the output layer applied to the hidden states must give the model's own logits.

        Models that rescale or soft-cap their logits after the output layer (Granite, Gemma 2,
        Cohere, ...) would otherwise train on a different distribution than they predict with.
        """
        if self.head_checked:
            return
        with torch.no_grad():
            weight = captured.head_weight
            mine = torch.nn.functional.linear(captured.hidden[:, -1:].to(weight.dtype), weight,
                                              captured.head_bias).float()
            theirs = logits[:, -1:].float()
            if mine.shape != theirs.shape or not torch.allclose(mine, theirs, rtol=1e-2, atol=1e-2):
                raise ValueError(
                    "ReMask(loss_impl='hidden'): the model transforms the output layer's logits (scaling or "
                    "soft-capping), so they cannot be recomputed from the hidden states; use "
                    "ReMask(loss_impl='logits').")
        self.head_checked = True


@dataclass
class LossRows:
    """The loss's inputs for one microbatch, gathered at predicted positions only."""

    full: torch.Tensor  # rows of hidden states (lean path) or of logits
    masked: torch.Tensor | None
    head_weight: torch.Tensor | None  # set on the lean path: rows are hidden states
    head_bias: torch.Tensor | None
    metric_logits: torch.Tensor | None  # (B, T, V) logits for train metrics, or None
    on_full_logits: Callable[[int, int, torch.Tensor], None] | None  # fills metric_logits chunk by chunk


def gather_loss_rows(model_logits: torch.Tensor, captured: Captured | None, rows: int, seq_len: int,
                     batch_idx: torch.Tensor, pos_idx: torch.Tensor, two_pass: bool,
                     want_metric_logits: bool, shared_index: tuple[torch.Tensor, torch.Tensor] | None = None,
                     ) -> LossRows:
    """Predicted rows of the forward, from captured hidden states or the logits.

    The forward ran ``[full; masked]`` along the batch, or, given ``shared_index`` (two B x T flat
    indices into the forward's positions), the shared-prefix layout: the full and the masked row's
    outputs at position ``t`` of row ``b`` sit at ``shared_index[0][b, t]`` and ``shared_index[1][b, t]``.
    """
    source = model_logits if captured is None else captured.hidden

    def masked_rows() -> torch.Tensor | None:
        if not two_pass:
            return None
        if shared_index is None:
            return source[rows:][batch_idx, pos_idx]
        return source.reshape(-1, source.shape[-1])[shared_index[1][batch_idx, pos_idx]]

    full_rows = source[:rows][batch_idx, pos_idx] if shared_index is None \
        else source.reshape(-1, source.shape[-1])[shared_index[0][batch_idx, pos_idx]]
    if captured is None:
        metric_logits = model_logits[:rows]
        if shared_index is not None:  # (B, L) outputs: the full rows' logits back at their (B, T) places
            metric_logits = model_logits.new_zeros((rows, seq_len, model_logits.shape[-1]))
            metric_logits[batch_idx, pos_idx] = full_rows.detach()
        return LossRows(full_rows, masked_rows(), None, None, metric_logits, None)
    metric_logits = on_full_logits = None
    if want_metric_logits:
        # Train metrics need (B, T, V) logits; filled at predicted positions only, in the dtype the
        # model's own logits have (bf16 under amp_bf16), like the logits SFT would keep.
        metric_logits = source.new_zeros((rows, seq_len, captured.head_weight.shape[0]), dtype=model_logits.dtype)

        def on_full_logits(start: int, end: int, chunk: torch.Tensor) -> None:
            metric_logits[batch_idx[start:end], pos_idx[start:end]] = chunk.to(metric_logits.dtype)

    return LossRows(full_rows, masked_rows(), captured.head_weight, captured.head_bias, metric_logits,
                    on_full_logits)
