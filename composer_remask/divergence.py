"""The ReMask loss: two cross-entropies and a divergence, computed lean and in fp32.

``0.5 * (CE(masked) + CE(full)) + weight * D(p_masked, p_full)``, averaged over predicted tokens.

The loss only ever looks at predicted positions. They are gathered first, then processed in
chunks: each chunk is projected through the output layer (when given hidden states), upcast to
fp32, and its loss and gradients are computed at once. Backward then only scales the stored
gradients, so no full-size logits tensor, fp32 or otherwise, lives until the backward pass.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from composer_remask.batch import IGNORE_INDEX

DIVERGENCES = ("sym_kl", "forward_kl", "reverse_kl", "js", "mse")

# Rows per chunk are chosen so one fp32 (rows x vocab) tensor holds about this many elements.
_CHUNK_ELEMENTS = 1 << 23


def token_divergence(logp_full: torch.Tensor, logp_masked: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token divergence between two rows of log-probabilities (last dim = vocabulary).

    ``forward_kl`` = KL(p_full || p_masked), ``reverse_kl`` = KL(p_masked || p_full),
    ``sym_kl`` their mean, ``js`` Jensen-Shannon, ``mse`` the mean squared difference of the
    log-probabilities over the vocabulary.
    """
    if kind == "forward_kl":
        return (logp_full.exp() * (logp_full - logp_masked)).sum(-1)
    if kind == "reverse_kl":
        return (logp_masked.exp() * (logp_masked - logp_full)).sum(-1)
    if kind == "sym_kl":
        diff = logp_full - logp_masked
        return 0.5 * ((logp_full.exp() - logp_masked.exp()) * diff).sum(-1)
    if kind == "js":
        logp_mix = torch.logaddexp(logp_full, logp_masked) - math.log(2.0)
        return 0.5 * ((logp_full.exp() * (logp_full - logp_mix)).sum(-1)
                      + (logp_masked.exp() * (logp_masked - logp_mix)).sum(-1))
    if kind == "mse":
        return (logp_full - logp_masked).pow(2).mean(-1)
    raise ValueError(f"unknown divergence {kind!r}; choose one of {DIVERGENCES}")


def _chunk_loss_sums(
    logits_full: torch.Tensor,
    logits_masked: torch.Tensor | None,
    targets: torch.Tensor,
    div_rows: torch.Tensor,
    divergence: str,
    detach_full: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sums over one chunk of rows: CE(full), CE(masked), divergence (all fp32 scalars)."""
    logp_full = torch.log_softmax(logits_full.float(), dim=-1)
    ce_full = F.nll_loss(logp_full, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    if logits_masked is None:
        zero = logp_full.new_zeros(())
        return ce_full, zero, zero
    logp_masked = torch.log_softmax(logits_masked.float(), dim=-1)
    ce_masked = F.nll_loss(logp_masked, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    teacher = logp_full.detach() if detach_full else logp_full
    div = (token_divergence(teacher, logp_masked, divergence) * div_rows).sum()
    return ce_full, ce_masked, div


def _subtract_at_targets(grad: torch.Tensor, targets: torch.Tensor, amount: float) -> None:
    """``grad[r, targets[r]] -= amount`` for rows with a target (no host sync)."""
    source = (targets != IGNORE_INDEX).to(grad.dtype).mul_(-amount).unsqueeze(-1)
    grad.scatter_add_(-1, targets.clamp(min=0).unsqueeze(-1), source)


def _logit_grads_kl(a, b, targets, div_rows, divergence, detach_full, ce_coef, div_coef):
    """Closed-form sums and logit gradients for CE and the KL family (fewest passes over V).

    With d = log p_full - log p_masked, KL_fm = sum p_full d and KL_mf = -sum p_masked d:
    dKL_fm/da = p_full (d - KL_fm), dKL_fm/db = p_masked - p_full,
    dKL_mf/da = p_full - p_masked,  dKL_mf/db = -p_masked (d + KL_mf).
    """
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
    d = logp_full.sub_(logp_masked)  # the log-probabilities are not needed any more
    p_masked = logp_masked.exp_()
    kl_fm = (p_full * d).sum(-1)
    kl_mf = -(p_masked * d).sum(-1)
    w = div_coef * div_rows.float()  # per-row weight of the divergence
    if divergence == "sym_kl":
        per_token = 0.5 * (kl_fm + kl_mf)
        # 0.5 [p_f (d - KL_fm) + p_f - p_m] and 0.5 [p_m - p_f - p_m (d + KL_mf)]
        grad_a = (d - kl_fm.unsqueeze(-1) + 1).mul_((0.5 * w).unsqueeze(-1))
        grad_b = (1 - d - kl_mf.unsqueeze(-1)).mul_((0.5 * w).unsqueeze(-1))
        cross_a, cross_b = -0.5 * w, -0.5 * w
    elif divergence == "forward_kl":
        per_token = kl_fm
        grad_a = (d - kl_fm.unsqueeze(-1)).mul_(w.unsqueeze(-1))
        grad_b = w.unsqueeze(-1).expand_as(d).clone()
        cross_a, cross_b = torch.zeros_like(w), -w
    else:  # reverse_kl
        per_token = kl_mf
        grad_a = w.unsqueeze(-1).expand_as(d).clone()
        grad_b = (-d - kl_mf.unsqueeze(-1)).mul_(w.unsqueeze(-1))
        cross_a, cross_b = -w, torch.zeros_like(w)
    # grad_a = p_full * (coef_a + ce) + cross_a * p_masked, and symmetrically for grad_b.
    grad_a.add_(ce_rows).mul_(p_full).add_(p_masked * cross_a.unsqueeze(-1))
    grad_b.add_(ce_rows).mul_(p_masked).add_(p_full * cross_b.unsqueeze(-1))
    if detach_full:  # the divergence does not train the full pass
        grad_a = p_full.mul_(ce_rows)
    _subtract_at_targets(grad_a, targets, ce_coef)
    _subtract_at_targets(grad_b, targets, ce_coef)
    div = (per_token * div_rows).sum()
    return ce_full, ce_masked, div, grad_a, grad_b


def _logit_grads_autograd(a, b, targets, div_rows, divergence, detach_full, ce_coef, div_coef):
    """Sums and logit gradients by autograd, for divergences without a closed form here."""
    with torch.enable_grad():
        a = a.detach().float().requires_grad_()
        b = None if b is None else b.detach().float().requires_grad_()
        ce_full, ce_masked, div = _chunk_loss_sums(a, b, targets, div_rows, divergence, detach_full)
        total = ce_coef * (ce_full + ce_masked) + div_coef * div
        grads = torch.autograd.grad(total, [a] if b is None else [a, b])
    return ce_full.detach(), ce_masked.detach(), div.detach(), grads[0], None if b is None else grads[1]


class _ChunkedRemaskLoss(torch.autograd.Function):
    """Loss and its gradient, chunk by chunk, from gathered rows of hidden states or logits.

    Forward returns ``(total, parts)`` with ``parts = [ce_full_sum, ce_masked_sum, div_sum]``
    (unscaled, not differentiable) and ``total = ce_scale * 0.5 * (ce sums) + div_scale * div``
    (``ce_scale * ce_full`` when there is no masked pass). Gradients are computed here, per chunk,
    and backward only scales them.
    """

    @staticmethod
    def forward(ctx, rows_full, rows_masked, weight, bias, targets, div_rows, ce_scale, div_scale,
                divergence, detach_full, chunk_rows, on_full_logits):
        two_pass = rows_masked is not None
        ce_coef = ce_scale * (0.5 if two_pass else 1.0)
        # Chunk gradients are formed with coefficients of order one and the scale is applied to the
        # fp32 accumulators, so fp16 matmuls do not underflow on 1/(tokens in the batch).
        norm = max(ce_coef, div_scale) or 1.0
        logit_grads = _logit_grads_kl if divergence in ("sym_kl", "forward_kl", "reverse_kl") \
            else _logit_grads_autograd
        inputs = (rows_full, rows_masked, weight, bias)
        needs = [t is not None and t.requires_grad for t in inputs]
        grads = [torch.zeros_like(t, dtype=torch.float32) if need else None for t, need in zip(inputs, needs)]
        sums = torch.zeros(3, dtype=torch.float32, device=rows_full.device)
        for start in range(0, rows_full.shape[0], chunk_rows):
            end = min(start + chunk_rows, rows_full.shape[0])
            h_full = rows_full[start:end].detach()
            h_masked = rows_masked[start:end].detach() if two_pass else None
            if weight is not None:
                logits_full = F.linear(h_full, weight.detach(), None if bias is None else bias.detach())
                logits_masked = F.linear(h_masked, weight.detach(), None if bias is None else bias.detach()) \
                    if two_pass else None
            else:
                logits_full, logits_masked = h_full, h_masked
            if on_full_logits is not None:
                on_full_logits(start, end, logits_full)
            ce_full, ce_masked, div, grad_a, grad_b = logit_grads(
                logits_full, logits_masked, targets[start:end], div_rows[start:end], divergence, detach_full,
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
                grads[0][start:end] = grad_a @ weight.detach()
            if needs[1]:
                grads[1][start:end] = grad_b @ weight.detach()
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
        ctx.mark_non_differentiable(sums)
        return total, sums

    @staticmethod
    def backward(ctx, grad_total, _grad_sums):
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
    weight: float,
    divergence: str,
    detach_full: bool,
    ce_scale: float,
    div_scale: float,
    output_weight: torch.Tensor | None = None,
    output_bias: torch.Tensor | None = None,
    on_full_logits=None,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Core entry point: rows are logits, or hidden states when ``output_weight`` is given.

    Returns ``(total, sums)``: the differentiable scaled total and the detached sums of CE(full),
    CE(masked) and the divergence. ``weight`` multiplies the divergence (folded into div_scale).
    ``on_full_logits(start, end, logits)`` receives each chunk's full-pass logits (for metrics).
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {DIVERGENCES}")
    vocab = output_weight.shape[0] if output_weight is not None else rows_full.shape[-1]
    chunk = chunk_rows or _chunk_rows_for(vocab, rows_full.device)
    return _ChunkedRemaskLoss.apply(
        rows_full, rows_masked, output_weight, output_bias, targets, div_rows,
        float(ce_scale), float(div_scale) * float(weight), divergence, detach_full, chunk, on_full_logits)


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

    Labels follow Hugging Face: aligned with the inputs, -100 where nothing is predicted; they are
    shifted here. Both CEs are token means over labelled positions; the divergence is a token mean
    over ``divergence_mask`` (unshifted, default: the labelled positions). Everything is computed
    in fp32 whatever the logits' dtype. Returns ``total``, ``ce_full``, ``ce_masked``, ``divergence``;
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
    n_ce = int((targets != IGNORE_INDEX).sum())
    n_div = int(div_rows.sum())
    total, sums = remask_loss_from_rows(
        logits_full[batch_idx, pos_idx], logits_masked[batch_idx, pos_idx], targets, div_rows,
        weight=weight, divergence=divergence, detach_full=detach_full,
        ce_scale=1.0 / max(n_ce, 1), div_scale=1.0 / max(n_div, 1))
    return {
        "total": total,
        "ce_full": sums[0] / max(n_ce, 1),
        "ce_masked": sums[1] / max(n_ce, 1),
        "divergence": sums[2] / max(n_div, 1),
    }
