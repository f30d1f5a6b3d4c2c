"""The divergence family: one per-token function of two rows of log-probabilities, one registry row each.

A new divergence is a function here and a row in ``DIVERGENCE_SPECS``; ``ReMask(divergence=...)``,
the YAML and :func:`composer_remask.remask.loss.remask_loss` accept it from there. A closed-form
logit gradient is optional: without one, the chunked loss (:mod:`composer_remask.remask.loss`)
takes the logits' gradient from autograd, block of rows by block of rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

__all__ = ["DIVERGENCES", "DIVERGENCE_SPECS", "ClosedForm", "DivergenceSpec", "LogitGrad", "divergence_spec",
           "token_divergence"]


class LogitGrad(NamedTuple):
    """One pass's divergence gradient in closed form, per row (``None`` = zero).

    With ``d = log p_full - log p_masked`` elementwise, the gradient of the divergence with respect
    to this pass's logits is ``p_self * (log_ratio_scale * d + offset) + cross * p_other``.
    """

    log_ratio_scale: torch.Tensor | None
    offset: torch.Tensor | None
    cross: torch.Tensor | None


class ClosedForm(NamedTuple):
    """A divergence's per-token values and its logit gradients for both passes."""

    per_token: torch.Tensor
    grad_full: LogitGrad
    grad_masked: LogitGrad


# A closed form receives kl_fm = sum p_full d, kl_mf = -sum p_masked d (per row) and each row's
# coefficient of the divergence in the loss, and returns the values and the gradients of
# coefficient * divergence.
ClosedFormFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], ClosedForm]


class DivergenceSpec(NamedTuple):
    """One divergence: its per-token value and, where one exists, its closed-form gradient."""

    per_token: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    closed_form: ClosedFormFn | None = None


def _forward_kl(logp_full: torch.Tensor, logp_masked: torch.Tensor) -> torch.Tensor:
    return (logp_full.exp() * (logp_full - logp_masked)).sum(-1)


def _reverse_kl(logp_full: torch.Tensor, logp_masked: torch.Tensor) -> torch.Tensor:
    return (logp_masked.exp() * (logp_masked - logp_full)).sum(-1)


def _sym_kl(logp_full: torch.Tensor, logp_masked: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((logp_full.exp() - logp_masked.exp()) * (logp_full - logp_masked)).sum(-1)


def _js(logp_full: torch.Tensor, logp_masked: torch.Tensor) -> torch.Tensor:
    logp_mix = torch.logaddexp(logp_full, logp_masked) - math.log(2.0)
    return 0.5 * ((logp_full.exp() * (logp_full - logp_mix)).sum(-1)
                  + (logp_masked.exp() * (logp_masked - logp_mix)).sum(-1))


def _mse(logp_full: torch.Tensor, logp_masked: torch.Tensor) -> torch.Tensor:
    return (logp_full - logp_masked).pow(2).mean(-1)


# d KL_fm / d full = p_full (d - KL_fm)     d KL_fm / d masked = p_masked - p_full
# d KL_mf / d full = p_full - p_masked      d KL_mf / d masked = -p_masked (d + KL_mf)


def _forward_kl_closed_form(kl_fm: torch.Tensor, kl_mf: torch.Tensor, row_coef: torch.Tensor) -> ClosedForm:
    return ClosedForm(kl_fm, LogitGrad(row_coef, -row_coef * kl_fm, None), LogitGrad(None, row_coef, -row_coef))


def _reverse_kl_closed_form(kl_fm: torch.Tensor, kl_mf: torch.Tensor, row_coef: torch.Tensor) -> ClosedForm:
    return ClosedForm(kl_mf, LogitGrad(None, row_coef, -row_coef), LogitGrad(-row_coef, -row_coef * kl_mf, None))


def _sym_kl_closed_form(kl_fm: torch.Tensor, kl_mf: torch.Tensor, row_coef: torch.Tensor) -> ClosedForm:
    half = 0.5 * row_coef
    return ClosedForm(0.5 * (kl_fm + kl_mf), LogitGrad(half, half * (1 - kl_fm), -half),
                      LogitGrad(-half, half * (1 - kl_mf), -half))


DIVERGENCE_SPECS: dict[str, DivergenceSpec] = {
    # sym_kl: the mean of the forward and the reverse KL (the card's choice).
    "sym_kl": DivergenceSpec(_sym_kl, _sym_kl_closed_form),
    # forward_kl: KL(p_full || p_masked).
    "forward_kl": DivergenceSpec(_forward_kl, _forward_kl_closed_form),
    # reverse_kl: KL(p_masked || p_full).
    "reverse_kl": DivergenceSpec(_reverse_kl, _reverse_kl_closed_form),
    # js: Jensen-Shannon.
    "js": DivergenceSpec(_js),
    # mse: the mean squared difference of the log-probabilities over the vocabulary.
    "mse": DivergenceSpec(_mse),
}
DIVERGENCES = tuple(DIVERGENCE_SPECS)


def divergence_spec(name: str) -> DivergenceSpec:
    """The registry row of ``name``: the one check of a divergence name, wherever it enters."""
    try:
        return DIVERGENCE_SPECS[name]
    except KeyError:
        raise ValueError(f"unknown divergence {name!r}; choose one of {tuple(DIVERGENCE_SPECS)}") from None


def token_divergence(logp_full: torch.Tensor, logp_masked: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token divergence between two rows of log-probabilities (last dim = vocabulary).

    ``kind`` names a row of ``DIVERGENCE_SPECS``: ``forward_kl`` = KL(p_full || p_masked),
    ``reverse_kl`` = KL(p_masked || p_full), ``sym_kl`` their mean, ``js`` Jensen-Shannon,
    ``mse`` the mean squared difference of the log-probabilities over the vocabulary.
    """
    return divergence_spec(kind).per_token(logp_full, logp_masked)
