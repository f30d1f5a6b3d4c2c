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
    if bool(div_rows.any()):
        teacher = logp_full.detach() if detach_full else logp_full
        div = token_divergence(teacher[div_rows], logp_masked[div_rows], divergence).sum()
    else:
        div = logp_full.new_zeros(())
    return ce_full, ce_masked, div


class _ChunkedRemaskLoss(torch.autograd.Function):
    """Loss and its gradient, chunk by chunk, from gathered rows of hidden states or logits.

    Forward returns ``(total, parts)`` with ``parts = [ce_full_sum, ce_masked_sum, div_sum]``
    (unscaled, not differentiable) and ``total = ce_scale * 0.5 * (ce sums) + div_scale * div``
    (``ce_scale * ce_full`` when there is no masked pass).
    """

    @staticmethod
    def forward(ctx, rows_full, rows_masked, weight, bias, targets, div_rows, ce_scale, div_scale,
                divergence, detach_full, chunk_rows, on_full_logits):
        inputs = (rows_full, rows_masked, weight, bias)
        needs = [t is not None and t.requires_grad for t in inputs]
        wanted = [i for i, need in enumerate(needs) if need]
        grads = [torch.zeros_like(t, dtype=torch.float32) if need else None for t, need in zip(inputs, needs)]
        sums = torch.zeros(3, dtype=torch.float32, device=rows_full.device)
        total = torch.zeros((), dtype=torch.float32, device=rows_full.device)
        for start in range(0, rows_full.shape[0], chunk_rows):
            end = min(start + chunk_rows, rows_full.shape[0])
            chunk = (rows_full[start:end], None if rows_masked is None else rows_masked[start:end], weight, bias)
            with torch.enable_grad():
                leaves = [None if t is None else t.detach().requires_grad_(need) for t, need in zip(chunk, needs)]
                chunk_full, chunk_masked, w_leaf, b_leaf = leaves
                if w_leaf is not None:
                    logits_full = F.linear(chunk_full, w_leaf, b_leaf)
                    logits_masked = None if chunk_masked is None else F.linear(chunk_masked, w_leaf, b_leaf)
                else:
                    logits_full, logits_masked = chunk_full, chunk_masked
                if on_full_logits is not None:
                    on_full_logits(start, end, logits_full.detach())
                ce_full, ce_masked, div = _chunk_loss_sums(
                    logits_full, logits_masked, targets[start:end], div_rows[start:end], divergence, detach_full)
                if logits_masked is None:  # single pass (plain SFT): the CE alone
                    chunk_total = ce_scale * ce_full
                else:
                    chunk_total = ce_scale * 0.5 * (ce_full + ce_masked) + div_scale * div
                if wanted and chunk_total.requires_grad:
                    chunk_grads = torch.autograd.grad(chunk_total, [leaves[i] for i in wanted])
                    for i, g in zip(wanted, chunk_grads):
                        if i < 2:  # per-row inputs: each chunk owns its rows
                            grads[i][start:end] = g
                        else:  # output layer: shared by all chunks
                            grads[i] += g
            sums += torch.stack([ce_full.detach(), ce_masked.detach(), div.detach()])
            total += chunk_total.detach()
        # Keep the gradients in the inputs' dtypes: an fp32 copy of the output layer is not needed.
        grads = [None if g is None else g.to(t.dtype) for g, t in zip(grads, inputs)]
        ctx.save_for_backward(*[g if g is not None else torch.empty(0) for g in grads])
        ctx.has_grad = needs
        ctx.mark_non_differentiable(sums)
        return total, sums

    @staticmethod
    def backward(ctx, grad_total, _grad_sums):
        grads = [g * grad_total.to(g.dtype) if has else None for g, has in zip(ctx.saved_tensors, ctx.has_grad)]
        return (*grads, None, None, None, None, None, None, None, None)


def _chunk_rows_for(vocab_size: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, vocab_size))


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
    chunk = chunk_rows or _chunk_rows_for(vocab)
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
