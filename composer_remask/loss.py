"""The ReMask loss: both cross-entropies and the divergence, computed lean and in fp32.

``0.5 * (CE(masked) + CE(full)) + divergence_weight * D(p_full, p_masked)``, averaged over
predicted tokens.

The loss only ever looks at predicted positions. They are gathered first, then processed in
chunks: each chunk is projected through the output layer (when given hidden states), upcast to
fp32, and its loss and gradients are computed at once. Backward then only scales the stored
gradients, so no full-size logits tensor, fp32 or otherwise, lives until the backward pass.

Divergences live in one registry, ``DIVERGENCE_SPECS``: a new divergence is one per-token function
of the two rows of log-probabilities plus one row there. A closed-form logit gradient is optional;
without one, each chunk's gradient comes from autograd on that chunk.

Correctness is pinned by ``reference_loss`` in ``tests/test_loss.py`` (the textbook formulas in
float64 on full tensors, no chunking and no gathering) and end to end, through a Trainer step, by
``tests/test_algorithm.py -k independent``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from composer_remask.batch import IGNORE_INDEX

# Rows per chunk are chosen so one fp32 (rows x vocab) tensor holds about this many elements.
_CHUNK_ELEMENTS = 1 << 23


class LossSums(NamedTuple):
    """Unscaled sums over the rows of one call (detached fp32 scalars)."""

    ce_full: torch.Tensor
    ce_masked: torch.Tensor
    divergence: torch.Tensor


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


# A closed form receives kl_fm = sum p_full d, kl_mf = -sum p_masked d (per row) and the per-row
# weight w of the divergence, and returns the values and the gradients of w * divergence.
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


def _forward_kl_closed_form(kl_fm: torch.Tensor, kl_mf: torch.Tensor, w: torch.Tensor) -> ClosedForm:
    return ClosedForm(kl_fm, LogitGrad(w, -w * kl_fm, None), LogitGrad(None, w, -w))


def _reverse_kl_closed_form(kl_fm: torch.Tensor, kl_mf: torch.Tensor, w: torch.Tensor) -> ClosedForm:
    return ClosedForm(kl_mf, LogitGrad(None, w, -w), LogitGrad(-w, -w * kl_mf, None))


def _sym_kl_closed_form(kl_fm: torch.Tensor, kl_mf: torch.Tensor, w: torch.Tensor) -> ClosedForm:
    half = 0.5 * w
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


def _spec(divergence: str) -> DivergenceSpec:
    try:
        return DIVERGENCE_SPECS[divergence]
    except KeyError:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {DIVERGENCES}") from None


def token_divergence(logp_full: torch.Tensor, logp_masked: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token divergence between two rows of log-probabilities (last dim = vocabulary).

    ``kind`` names a row of ``DIVERGENCE_SPECS``: ``forward_kl`` = KL(p_full || p_masked),
    ``reverse_kl`` = KL(p_masked || p_full), ``sym_kl`` their mean, ``js`` Jensen-Shannon,
    ``mse`` the mean squared difference of the log-probabilities over the vocabulary.
    """
    return _spec(kind).per_token(logp_full, logp_masked)


def _subtract_at_targets(grad: torch.Tensor, targets: torch.Tensor, amount: float) -> None:
    """``grad[r, targets[r]] -= amount`` for rows with a target (no host sync)."""
    source = (targets != IGNORE_INDEX).to(grad.dtype).mul_(-amount).unsqueeze(-1)
    grad.scatter_add_(-1, targets.clamp(min=0).unsqueeze(-1), source)


def _apply_logit_grad(grad: LogitGrad, p_self: torch.Tensor, p_other: torch.Tensor, log_ratio: torch.Tensor,
                      ce_rows: torch.Tensor) -> torch.Tensor:
    """``p_self * (scale * d + offset + ce) + cross * p_other``: the closed form plus the CE's softmax term."""
    offset = ce_rows if grad.offset is None else grad.offset.unsqueeze(-1) + ce_rows
    if grad.log_ratio_scale is None:
        out = p_self * offset
    else:
        out = torch.addcmul(offset, log_ratio, grad.log_ratio_scale.unsqueeze(-1)).mul_(p_self)
    if grad.cross is not None:
        out.addcmul_(p_other, grad.cross.unsqueeze(-1))
    return out


def _chunk_sums(logits_full, logits_masked, targets, div_rows, spec, detach_full):
    """Sums over one chunk of rows: CE(full), CE(masked), divergence (fp32, differentiable)."""
    logp_full = torch.log_softmax(logits_full.float(), dim=-1)
    ce_full = F.nll_loss(logp_full, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    if logits_masked is None:
        zero = logp_full.new_zeros(())
        return ce_full, zero, zero
    logp_masked = torch.log_softmax(logits_masked.float(), dim=-1)
    ce_masked = F.nll_loss(logp_masked, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    teacher = logp_full.detach() if detach_full else logp_full
    div = (spec.per_token(teacher, logp_masked) * div_rows).sum()
    return ce_full, ce_masked, div


def _logit_grads_closed_form(a, b, targets, div_rows, spec, detach_full, ce_coef, div_coef):
    """Sums and logit gradients from the divergence's closed form (fewest passes over V)."""
    valid = targets != IGNORE_INDEX
    safe = targets.clamp(min=0).unsqueeze(-1)
    logp_full = torch.log_softmax(a.float(), dim=-1)
    ce_full = -(logp_full.gather(-1, safe).squeeze(-1) * valid).sum()
    ce_rows = (ce_coef * valid.float()).unsqueeze(-1)  # rows without a target get no CE gradient
    if b is None:
        grad_a = logp_full.exp_().mul_(ce_rows)
        _subtract_at_targets(grad_a, targets, ce_coef)
        zero = ce_full.new_zeros(())
        return ce_full, zero, zero, grad_a, None
    logp_masked = torch.log_softmax(b.float(), dim=-1)
    ce_masked = -(logp_masked.gather(-1, safe).squeeze(-1) * valid).sum()
    p_full = logp_full.exp()
    log_ratio = logp_full.sub_(logp_masked)  # the log-probabilities are not needed any more
    p_masked = logp_masked.exp_()
    kl_fm = (p_full * log_ratio).sum(-1)
    kl_mf = -(p_masked * log_ratio).sum(-1)
    closed = spec.closed_form(kl_fm, kl_mf, div_coef * div_rows.float())
    if detach_full:  # the divergence does not train the full pass
        grad_a = p_full * ce_rows
    else:
        grad_a = _apply_logit_grad(closed.grad_full, p_full, p_masked, log_ratio, ce_rows)
    grad_b = _apply_logit_grad(closed.grad_masked, p_masked, p_full, log_ratio, ce_rows)
    _subtract_at_targets(grad_a, targets, ce_coef)
    _subtract_at_targets(grad_b, targets, ce_coef)
    div = (closed.per_token * div_rows).sum()
    return ce_full, ce_masked, div, grad_a, grad_b


def _logit_grads_autograd(a, b, targets, div_rows, spec, detach_full, ce_coef, div_coef):
    """Sums and logit gradients by autograd on the chunk, for divergences without a closed form."""
    with torch.enable_grad():
        a = a.detach().float().requires_grad_()
        b = None if b is None else b.detach().float().requires_grad_()
        ce_full, ce_masked, div = _chunk_sums(a, b, targets, div_rows, spec, detach_full)
        total = ce_coef * (ce_full + ce_masked) + div_coef * div
        grads = torch.autograd.grad(total, [a] if b is None else [a, b])
    return ce_full.detach(), ce_masked.detach(), div.detach(), grads[0], None if b is None else grads[1]


class _ChunkedRemaskLoss(torch.autograd.Function):
    """Loss and its gradient, chunk by chunk, from gathered rows of hidden states or logits.

    Forward returns ``(total, ce_full_sum, ce_masked_sum, div_sum)`` with the sums unscaled and not
    differentiable, and ``total = ce_scale * 0.5 * (ce sums) + div_scale * div`` (``ce_scale *
    ce_full`` when there is no masked pass). Gradients are computed here, per chunk, and backward
    only scales them.
    """

    @staticmethod
    def forward(ctx, rows_full, rows_masked, head_weight, head_bias, targets, div_rows, ce_scale, div_scale,
                spec, detach_full, chunk_rows, on_full_logits):
        two_pass = rows_masked is not None
        ce_coef = ce_scale * (0.5 if two_pass else 1.0)
        # Chunk gradients are formed with coefficients of order one and the scale is applied to the
        # fp32 accumulators, so fp16 matmuls do not underflow on 1/(tokens in the batch).
        norm = max(ce_coef, div_scale) or 1.0
        logit_grads = _logit_grads_closed_form if spec.closed_form is not None else _logit_grads_autograd
        inputs = (rows_full, rows_masked, head_weight, head_bias)
        needs = [t is not None and t.requires_grad for t in inputs]
        grads = [torch.zeros_like(t, dtype=torch.float32) if need else None for t, need in zip(inputs, needs)]
        sums = torch.zeros(3, dtype=torch.float32, device=rows_full.device)
        weight = None if head_weight is None else head_weight.detach()
        bias = None if head_bias is None else head_bias.detach()
        for start in range(0, rows_full.shape[0], chunk_rows):
            end = min(start + chunk_rows, rows_full.shape[0])
            h_full = rows_full[start:end].detach()
            h_masked = rows_masked[start:end].detach() if two_pass else None
            if weight is not None:
                logits_full = F.linear(h_full, weight, bias)
                logits_masked = F.linear(h_masked, weight, bias) if two_pass else None
            else:
                logits_full, logits_masked = h_full, h_masked
            if on_full_logits is not None:
                on_full_logits(start, end, logits_full)
            ce_full, ce_masked, div, grad_a, grad_b = logit_grads(
                logits_full, logits_masked, targets[start:end], div_rows[start:end], spec, detach_full,
                ce_coef / norm, div_scale / norm)
            del logits_full, logits_masked
            sums += torch.stack([ce_full, ce_masked, div])
            if weight is None:  # rows are the logits themselves
                if needs[0]:
                    grads[0][start:end] = grad_a
                if needs[1]:
                    grads[1][start:end] = grad_b
                continue
            grad_a, grad_b = grad_a.to(weight.dtype), None if grad_b is None else grad_b.to(weight.dtype)
            if needs[0]:
                grads[0][start:end] = grad_a @ weight
            if needs[1]:
                grads[1][start:end] = grad_b @ weight
            if needs[2]:
                grads[2] += grad_a.t() @ h_full.to(weight.dtype)
                if two_pass:
                    grads[2] += grad_b.t() @ h_masked.to(weight.dtype)
            if needs[3]:
                grads[3] += grad_a.float().sum(0) + (grad_b.float().sum(0) if two_pass else 0.0)
        total = ce_coef * (sums[0] + sums[1]) + div_scale * sums[2] if two_pass else ce_coef * sums[0]
        # Keep the gradients in the inputs' dtypes (no fp32 copy of the output layer), except fp16,
        # whose range cannot hold them before backward multiplies in the grad scaler's factor.
        grads = [None if g is None else g.mul_(norm).to(torch.float32 if t.dtype == torch.float16 else t.dtype)
                 for g, t in zip(grads, inputs)]
        ctx.save_for_backward(*[g if g is not None else torch.empty(0) for g in grads])
        ctx.has_grad = needs
        ctx.input_dtypes = [None if t is None else t.dtype for t in inputs]
        sums = sums.unbind()
        ctx.mark_non_differentiable(*sums)
        return (total, *sums)

    @staticmethod
    def backward(ctx, grad_total, *_grad_sums):
        grads = [(g * grad_total.to(g.dtype)).to(dtype) if has else None
                 for g, has, dtype in zip(ctx.saved_tensors, ctx.has_grad, ctx.input_dtypes)]
        return (*grads, None, None, None, None, None, None, None, None)


def _chunk_rows_for(vocab_size: int, device: torch.device) -> int:
    # Bigger chunks on GPUs: fewer kernel launches and wider matmuls; a few fp32 buffers of this size.
    elements = _CHUNK_ELEMENTS * (4 if device.type == "cuda" else 1)
    return max(1, elements // max(1, vocab_size))


def predicted_positions(labels: torch.Tensor, divergence_mask: torch.Tensor | None):
    """Positions (batch, t) whose output predicts token t+1, with shifted targets and div flags.

    Returns ``(batch_idx, pos_idx, targets, div_rows)`` over the union of labelled positions and
    divergence positions; ``targets`` is -100 where only the divergence applies.
    """
    shifted = labels[:, 1:]
    has_label = shifted != IGNORE_INDEX
    div = has_label if divergence_mask is None else divergence_mask[:, 1:].bool()
    keep = has_label | div
    batch_idx, pos_idx = keep.nonzero(as_tuple=True)
    targets = shifted[batch_idx, pos_idx]
    return batch_idx, pos_idx, targets, div[batch_idx, pos_idx]


def remask_loss_from_rows(
    rows_full: torch.Tensor,
    rows_masked: torch.Tensor | None,
    targets: torch.Tensor,
    div_rows: torch.Tensor,
    *,
    divergence_weight: float,
    divergence: str,
    detach_full: bool,
    ce_scale: float,
    div_scale: float,
    head_weight: torch.Tensor | None = None,
    head_bias: torch.Tensor | None = None,
    on_full_logits: Callable[[int, int, torch.Tensor], None] | None = None,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, LossSums]:
    """Core entry point: rows are logits, or hidden states when ``head_weight`` is given.

    ``head_weight`` / ``head_bias`` are the output layer's (vocab x hidden) weight and bias.
    Returns ``(total, sums)``: the differentiable scaled total
    ``ce_scale * 0.5 * (ce_full + ce_masked) + div_scale * divergence_weight * divergence``
    (``ce_scale * ce_full`` without a masked pass) and the detached, unscaled ``LossSums``.
    ``on_full_logits(start, end, logits)`` receives each chunk's full-pass logits (for metrics).
    """
    spec = _spec(divergence)
    vocab = head_weight.shape[0] if head_weight is not None else rows_full.shape[-1]
    chunk = chunk_rows or _chunk_rows_for(vocab, rows_full.device)
    total, *sums = _ChunkedRemaskLoss.apply(
        rows_full, rows_masked, head_weight, head_bias, targets, div_rows,
        float(ce_scale), float(div_scale) * float(divergence_weight), spec, detach_full, chunk, on_full_logits)
    return total, LossSums(*sums)


def remask_loss(
    logits_full: torch.Tensor,
    logits_masked: torch.Tensor,
    labels: torch.Tensor,
    *,
    weight: float = 0.1,
    divergence: str = "sym_kl",
    divergence_mask: torch.Tensor | None = None,
    detach_full: bool = False,
) -> dict[str, torch.Tensor]:
    """ReMask's objective on one batch of logits (B x T x V) with unshifted labels (B x T).

    ``weight`` is the divergence weight (the card's name for it). Labels follow Hugging Face:
    aligned with the inputs, -100 where nothing is predicted; they are shifted here. Both CEs are
    token means over labelled positions; the divergence is a token mean over ``divergence_mask``
    (unshifted, default: the labelled positions). Everything is computed in fp32 whatever the
    logits' dtype. Returns ``total``, ``ce_full``, ``ce_masked``, ``divergence``;
    ``total = 0.5 * (ce_full + ce_masked) + weight * divergence``.

    Example::

        out = remask_loss(model(full_ids).logits, model(masked_ids).logits, labels, weight=0.1)
        out["total"].backward()
    """
    if logits_full.shape != logits_masked.shape:
        raise ValueError(f"logits_full {tuple(logits_full.shape)} and logits_masked "
                         f"{tuple(logits_masked.shape)} must have the same shape")
    if logits_full.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits_full.shape)} do not match labels {tuple(labels.shape)}")
    batch_idx, pos_idx, targets, div_rows = predicted_positions(labels, divergence_mask)
    n_ce = max(int((targets != IGNORE_INDEX).sum()), 1)
    n_div = max(int(div_rows.sum()), 1)
    total, sums = remask_loss_from_rows(
        logits_full[batch_idx, pos_idx], logits_masked[batch_idx, pos_idx], targets, div_rows,
        divergence_weight=weight, divergence=divergence, detach_full=detach_full,
        ce_scale=1.0 / n_ce, div_scale=1.0 / n_div)
    return {
        "total": total,
        "ce_full": sums.ce_full / n_ce,
        "ce_masked": sums.ce_masked / n_ce,
        "divergence": sums.divergence / n_div,
    }
