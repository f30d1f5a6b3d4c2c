"""The ReMask loss: both cross-entropies and the divergence, computed lean and in fp32.

``0.5 * (CE(masked) + CE(full)) + divergence_weight * D(p_full, p_masked)``, averaged over
predicted tokens; ``D`` is a row of :mod:`composer_remask.remask.divergences`.

The loss only ever looks at predicted positions. They are gathered first, then processed in
chunks: each chunk is projected through the output layer (when given hidden states), upcast to
fp32, and its loss and gradients are computed at once. Backward then only scales the stored
gradients, so no full-size logits tensor, fp32 or otherwise, lives until the backward pass.

Each value has one name here: ``divergence_weight`` (``ReMask(weight=...)``), the normalization
multipliers ``ce_scale`` / ``div_scale`` of the token sums (:mod:`composer_remask.remask.loss_weighting`),
and their products, the coefficients ``ce_coef`` (of each CE sum) and ``divergence_coef`` (of the
divergence sum) in the total; ``row_coef`` is the divergence coefficient of each row.

Correctness is pinned by ``reference_loss`` in ``tests/helpers/reference_loss.py`` (the textbook formulas in
float64 on full tensors, no chunking and no gathering) and end to end, through a Trainer step, by
``tests/remask/test_algorithm.py -k independent``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from composer_remask.batch import IGNORE_INDEX
from composer_remask.checks import finite_number
from composer_remask.remask.divergences import DivergenceSpec, LogitGrad, divergence_spec

# Rows per chunk are chosen so the chunk's logits (both passes) hold about this many elements; the
# elementwise work then runs on blocks of about _BLOCK_ELEMENTS, which stay in a CPU core's cache.
_CHUNK_ELEMENTS = 1 << 25
_BLOCK_ELEMENTS = 1 << 23


class LossSums(NamedTuple):
    """Unscaled sums over the rows of one call (detached fp32 scalars)."""

    ce_full: torch.Tensor
    ce_masked: torch.Tensor
    divergence: torch.Tensor


class _BlockTerms(NamedTuple):
    """What a block's gradient is formed from: the divergence and both coefficients, of order one."""

    spec: DivergenceSpec
    detach_full: bool
    ce_coef: float
    divergence_coef: float


@dataclass(frozen=True)
class _ChunkPlan:
    """Everything one call of the chunked loss needs besides the differentiable rows."""

    targets: torch.Tensor  # per row: the next token, -100 where only the divergence applies
    div_rows: torch.Tensor  # per row: whether the divergence covers it
    ce_coef: float
    divergence_coef: float
    spec: DivergenceSpec
    detach_full: bool
    chunk_rows: int
    on_full_logits: Callable[[int, int, torch.Tensor], None] | None

    @property
    def normalizer(self) -> float:
        """Chunk gradients are formed with coefficients of order one and this is applied to the fp32
        accumulators, so fp16 matmuls do not underflow on 1/(tokens in the batch)."""
        return max(self.ce_coef, self.divergence_coef) or 1.0

    def block_terms(self) -> _BlockTerms:
        norm = self.normalizer
        return _BlockTerms(self.spec, self.detach_full, self.ce_coef / norm, self.divergence_coef / norm)


def _subtract_at_targets(grad: torch.Tensor, targets: torch.Tensor, amount: float) -> None:
    """``grad[r, targets[r]] -= amount`` for rows with a target (no host sync)."""
    source = (targets != IGNORE_INDEX).to(grad.dtype).mul_(-amount).unsqueeze(-1)
    grad.scatter_add_(-1, targets.clamp(min=0).unsqueeze(-1), source)


class _Workspace:
    """Buffers reused by every chunk and block of one call, so they are allocated once."""

    def __init__(self, vocab: int, device: torch.device) -> None:
        self.vocab, self.device = vocab, device
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int, dtype: torch.dtype) -> torch.Tensor:
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape[0] < rows or buffer.dtype != dtype:
            buffer = torch.empty(rows, self.vocab, dtype=dtype, device=self.device)
            self._buffers[name] = buffer
        return buffer[:rows]


def _fill_divergence_factor(out: torch.Tensor, grad: LogitGrad, log_ratio: torch.Tensor,
                            ce_rows: torch.Tensor) -> None:
    """``out = scale * d + offset + ce``: the factor the pass's own probabilities multiply."""
    offset = ce_rows if grad.offset is None else grad.offset + ce_rows
    if grad.log_ratio_scale is None:
        out.copy_(offset.unsqueeze(-1).expand_as(out))
    else:
        torch.addcmul(offset.unsqueeze(-1), log_ratio, grad.log_ratio_scale.unsqueeze(-1), out=out)


def _write_pass_grad(out: torch.Tensor, grad: torch.Tensor, cross: torch.Tensor | None,
                     p_other: torch.Tensor) -> None:
    """``out = grad + cross * p_other`` (cast to ``out``'s dtype once, at the end)."""
    if cross is None:
        out.copy_(grad)
    else:
        torch.addcmul(grad, p_other, cross.unsqueeze(-1), out=out)


def _closed_form_block(logits: torch.Tensor, two_pass: bool, targets: torch.Tensor, div_rows: torch.Tensor,
                       terms: _BlockTerms, work: _Workspace) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One block's sums; overwrites ``logits`` with their gradient (CE's and the divergence's closed forms).

    Rows interleave the passes (full, masked, full, ...). The block is small enough to stay in cache
    across the dozen elementwise passes: log-softmax, exp, the log-ratio d, the row dot products,
    and the multiply-adds that form the gradient (all fp32).
    """
    passes = 2 if two_pass else 1
    valid = targets != IGNORE_INDEX
    ce_rows = terms.ce_coef * valid.float()  # rows without a target get no CE gradient
    row_targets = targets.repeat_interleave(passes) if two_pass else targets
    logp = torch.log_softmax(logits, -1, dtype=torch.float32, out=work.get("logp", logits.shape[0], torch.float32))
    target_logp = logp.gather(-1, row_targets.clamp(min=0).unsqueeze(-1)).view(-1, passes)
    ce = -(target_logp * valid.unsqueeze(-1)).sum(0)
    if not two_pass:
        grad = logp.exp_().mul_(ce_rows.unsqueeze(-1))
        _subtract_at_targets(grad, targets, terms.ce_coef)
        logits.copy_(grad)
        return ce, None
    rows, vocab = targets.shape[0], logits.shape[-1]
    probs = torch.exp(logp, out=work.get("probs", logits.shape[0], torch.float32))
    logp_pairs, prob_pairs = logp.view(rows, 2, vocab), probs.view(rows, 2, vocab)
    p_full, p_masked = prob_pairs[:, 0], prob_pairs[:, 1]
    log_ratio = torch.sub(logp_pairs[:, 0], logp_pairs[:, 1], out=logp_pairs[:, 0])  # d = log p_full - log p_masked
    dots = torch.bmm(prob_pairs, log_ratio.unsqueeze(-1)).view(rows, 2)  # sum p_full d, sum p_masked d
    closed = terms.spec.closed_form(dots[:, 0], -dots[:, 1], terms.divergence_coef * div_rows.float())
    # The gradient overwrites the log-probabilities: the masked rows first, as they read d from the full rows.
    grad_full, grad_masked = logp_pairs[:, 0], logp_pairs[:, 1]
    _fill_divergence_factor(grad_masked, closed.grad_masked, log_ratio, ce_rows)
    if terms.detach_full:  # the divergence does not train the full pass
        grad_full.copy_(ce_rows.unsqueeze(-1).expand_as(grad_full))
    else:
        _fill_divergence_factor(grad_full, closed.grad_full, log_ratio, ce_rows)
    grad = logp.mul_(probs)
    _subtract_at_targets(grad, row_targets, terms.ce_coef)
    out_pairs = logits.view(rows, 2, vocab)
    _write_pass_grad(out_pairs[:, 0], grad_full, None if terms.detach_full else closed.grad_full.cross, p_masked)
    _write_pass_grad(out_pairs[:, 1], grad_masked, closed.grad_masked.cross, p_full)
    return ce, (closed.per_token * div_rows).sum()


def _chunk_sums(logits_full: torch.Tensor, logits_masked: torch.Tensor, targets: torch.Tensor,
                div_rows: torch.Tensor, spec: DivergenceSpec,
                detach_full: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sums over rows: CE(full), CE(masked), divergence (fp32, differentiable)."""
    logp_full = torch.log_softmax(logits_full.float(), dim=-1)
    ce_full = F.nll_loss(logp_full, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    logp_masked = torch.log_softmax(logits_masked.float(), dim=-1)
    ce_masked = F.nll_loss(logp_masked, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    teacher = logp_full.detach() if detach_full else logp_full
    div = (spec.per_token(teacher, logp_masked) * div_rows).sum()
    return ce_full, ce_masked, div


def _autograd_block(logits: torch.Tensor, two_pass: bool, targets: torch.Tensor, div_rows: torch.Tensor,
                    terms: _BlockTerms, work: _Workspace) -> tuple[torch.Tensor, torch.Tensor]:
    """One block's sums, ``logits`` overwritten by their gradient by autograd (divergences without a
    closed form)."""
    with torch.enable_grad():
        stacked = logits.detach().float().requires_grad_()
        pairs = stacked.view(targets.shape[0], 2, -1)
        ce_full, ce_masked, div = _chunk_sums(pairs[:, 0], pairs[:, 1], targets, div_rows, terms.spec,
                                              terms.detach_full)
        (grad,) = torch.autograd.grad(terms.ce_coef * (ce_full + ce_masked) + terms.divergence_coef * div, [stacked])
    logits.copy_(grad)
    return torch.stack([ce_full.detach(), ce_masked.detach()]), div.detach()


class _OutputLayer(NamedTuple):
    """The output layer as the chunk products use it (``weight`` is ``None`` when rows are logits)."""

    weight: torch.Tensor | None
    bias: torch.Tensor | None
    compute_dtype: torch.dtype
    vocab: int


def _output_layer(head_weight: torch.Tensor | None, head_bias: torch.Tensor | None,
                  rows_full: torch.Tensor) -> _OutputLayer:
    """One cast of the output layer per call (autocast would cast it again for every product), in
    autocast's dtype when it is on, else the weight's."""
    if head_weight is None:
        return _OutputLayer(None, None, torch.float32, rows_full.shape[-1])
    device_type = head_weight.device.type
    compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) \
        else head_weight.dtype
    weight = head_weight.detach().to(compute_dtype)
    bias = None if head_bias is None else head_bias.detach().to(compute_dtype)
    return _OutputLayer(weight, bias, compute_dtype, weight.shape[0])


class _InputGrads:
    """fp32 gradients of ``(rows_full, rows_masked, head_weight, head_bias)``, ``None`` where not needed."""

    def __init__(self, inputs: tuple[torch.Tensor | None, ...], compute_dtype: torch.dtype) -> None:
        self.needs = [t is not None and t.requires_grad for t in inputs]
        device = inputs[0].device
        # The first chunk writes the output weight's gradient (no zero fill); accumulated after that.
        self.first_chunk_writes_weight = self.needs[2] and compute_dtype == torch.float32 and inputs[0].shape[0] > 0
        self.buffers = [
            None if not need else (torch.empty if i == 2 and self.first_chunk_writes_weight else torch.zeros)(
                t.shape, dtype=torch.float32, device=device) for i, (t, need) in enumerate(zip(inputs, self.needs))]

    def add_chunk(self, grad: torch.Tensor, hidden: torch.Tensor | None, head: _OutputLayer, passes: int,
                  start: int, end: int) -> None:
        """Add one chunk's contribution, ``grad`` being the logits' gradient in the products' dtype."""
        needs, grads, rows = self.needs, self.buffers, end - start
        if head.weight is None:  # rows are the logits themselves
            for i in range(passes):
                if needs[i]:
                    grads[i][start:end] = grad.view(rows, passes, head.vocab)[:, i]
            return
        if needs[3]:
            grads[3] += grad.sum(0, dtype=torch.float32)
        _hidden_grads(grad, head.weight, rows, passes, needs, grads, start, end)
        if needs[2]:
            if self.first_chunk_writes_weight and start == 0:
                torch.mm(grad.t(), hidden, out=grads[2])
            elif head.compute_dtype == torch.float32:
                grads[2].addmm_(grad.t(), hidden)
            else:  # no mixed-dtype addmm_: the low-precision product, added in fp32
                grads[2] += grad.t() @ hidden


def _chunk_logits(parts: list[torch.Tensor], head: _OutputLayer,
                  work: _Workspace) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The chunk's logits, full and masked rows interleaved, and the interleaved hidden rows (if any)."""
    passes, rows = len(parts), parts[0].shape[0]
    logits = work.get("logits", passes * rows, head.compute_dtype)
    if head.weight is None:
        for i, part in enumerate(parts):
            logits.view(rows, passes, head.vocab)[:, i].copy_(part)
        return logits, None
    hidden = torch.stack(parts, dim=1).view(passes * rows, -1).to(head.compute_dtype)
    if head.bias is None:
        torch.mm(hidden, head.weight.t(), out=logits)
    else:
        torch.addmm(head.bias, hidden, head.weight.t(), out=logits)
    return logits, hidden


def _chunk_logit_grads(logits: torch.Tensor, plan: _ChunkPlan, start: int, end: int, block_rows: int,
                       sums: torch.Tensor, work: _Workspace) -> None:
    """Overwrite a chunk's logits with their gradient, block by cache-sized block; add the block sums."""
    passes = logits.shape[0] // (end - start)
    two_pass = passes == 2
    terms = plan.block_terms()
    block_grads = _closed_form_block if terms.spec.closed_form is not None or not two_pass else _autograd_block
    for block in range(0, end - start, block_rows):
        block_end = min(block + block_rows, end - start)
        ce, div = block_grads(logits[passes * block:passes * block_end], two_pass,
                              plan.targets[start + block:start + block_end],
                              plan.div_rows[start + block:start + block_end], terms, work)
        sums[:passes] += ce
        if div is not None:
            sums[2] += div


class _ChunkedRemaskLoss(torch.autograd.Function):
    """Loss and its gradient, chunk by chunk, from gathered rows of hidden states or logits.

    Forward returns ``(total, ce_full_sum, ce_masked_sum, div_sum)`` with the sums unscaled and not
    differentiable, and ``total = ce_coef * (ce sums) + divergence_coef * div`` (``ce_coef *
    ce_full`` when there is no masked pass). A chunk interleaves its full and masked rows, so each
    product runs once over both: the logits, the hidden rows' gradient, and the output weight's
    gradient, accumulated in place in one fp32 buffer. The logits buffer is then overwritten, block
    by cache-sized block, by the logits' gradient. Backward only scales the stored gradients.
    """

    @staticmethod
    def forward(ctx: Any, rows_full: torch.Tensor, rows_masked: torch.Tensor | None,
                head_weight: torch.Tensor | None, head_bias: torch.Tensor | None,
                plan: _ChunkPlan) -> tuple[torch.Tensor, ...]:
        inputs = (rows_full, rows_masked, head_weight, head_bias)
        head = _output_layer(head_weight, head_bias, rows_full)
        grads = _InputGrads(inputs, head.compute_dtype)
        parts = [rows for rows in (rows_full, rows_masked) if rows is not None]
        passes, n_rows, device = len(parts), rows_full.shape[0], rows_full.device
        block_rows = _block_rows_for(head.vocab, min(plan.chunk_rows, n_rows), device, passes)
        work = _Workspace(head.vocab, device)
        sums = torch.zeros(3, dtype=torch.float32, device=device)
        with torch.autocast(device.type, enabled=False):  # every dtype below is explicit
            for start in range(0, n_rows, plan.chunk_rows):
                end = min(start + plan.chunk_rows, n_rows)
                logits, hidden = _chunk_logits([part[start:end] for part in parts], head, work)
                if plan.on_full_logits is not None:
                    plan.on_full_logits(start, end, logits.view(end - start, passes, head.vocab)[:, 0])
                _chunk_logit_grads(logits, plan, start, end, block_rows, sums, work)
                grads.add_chunk(logits, hidden, head, passes, start, end)
        two_pass = passes == 2
        total = plan.ce_coef * (sums[0] + sums[1]) + plan.divergence_coef * sums[2] if two_pass \
            else plan.ce_coef * sums[0]
        _keep_for_backward(ctx, grads.buffers, inputs, plan.normalizer)
        sums = sums.unbind()
        ctx.mark_non_differentiable(*sums)
        return (total, *sums)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_total: torch.Tensor, *_grad_sums: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("the ReMask loss stores its gradients for one backward pass; "
                               "recompute the loss instead of backpropagating through it twice")
        # Scaled in place: no second copy of the output layer's gradient.
        grads = [None if g is None else g.mul_((grad_total * scale).to(g.dtype)).to(dtype)
                 for g, scale, dtype in zip(grads, ctx.pending_scale, ctx.input_dtypes)]
        return (*grads, None)


def _keep_for_backward(ctx: Any, grads: list[torch.Tensor | None], inputs: tuple[torch.Tensor | None, ...],
                       norm: float) -> None:
    """Store the gradients for backward: those kept in fp32 are scaled by ``norm`` there, in the same
    pass as backward's factor. The others go to the inputs' dtypes now (no fp32 copy of a bf16 output
    layer); fp16 stays fp32, as its range cannot hold them before backward multiplies in the grad
    scaler's factor."""
    ctx.grads, ctx.pending_scale = [], []
    for g, t in zip(grads, inputs):
        if g is not None and t.dtype not in (torch.float32, torch.float16):
            g = g.mul_(norm).to(t.dtype)
        ctx.grads.append(g)
        ctx.pending_scale.append(1.0 if g is None or g.dtype != torch.float32 else norm)
    ctx.input_dtypes = [None if t is None else t.dtype for t in inputs]


def _hidden_grads(grad: torch.Tensor, weight: torch.Tensor, rows: int, passes: int, needs: list[bool],
                  grads: list[torch.Tensor | None], start: int, end: int) -> None:
    """Gradients of the hidden rows: one product over the interleaved passes when all need one."""
    wanted = [i for i in range(passes) if needs[i]]
    if len(wanted) == passes:
        product = (grad @ weight).view(rows, passes, -1)
        for i in wanted:
            grads[i][start:end] = product[:, i]
    else:
        for i in wanted:
            grads[i][start:end] = grad.view(rows, passes, -1)[:, i] @ weight


def _balanced_rows(n_rows: int, max_rows: int) -> int:
    """Rows per piece when ``n_rows`` are split into as few pieces of at most ``max_rows`` as possible, evenly."""
    pieces = max(1, math.ceil(n_rows / max(1, max_rows)))
    return max(1, math.ceil(n_rows / pieces))


def _chunk_rows_for(vocab_size: int, n_rows: int, device: torch.device, passes: int) -> int:
    """Rows per pass in a chunk: the (passes * rows x V) logits buffer holds at most about _CHUNK_ELEMENTS."""
    elements = _CHUNK_ELEMENTS * (2 if device.type == "cuda" else 1)
    return _balanced_rows(n_rows, elements // max(1, passes * vocab_size))


def _block_rows_for(vocab_size: int, n_rows: int, device: torch.device, passes: int) -> int:
    """Rows per pass in an elementwise block (about _BLOCK_ELEMENTS; on GPUs a whole chunk)."""
    elements = _BLOCK_ELEMENTS * (16 if device.type == "cuda" else 1)
    return _balanced_rows(n_rows, elements // max(1, passes * vocab_size))


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

    ``head_weight`` / ``head_bias`` are the output layer's (vocab x hidden) weight and bias;
    ``ce_scale`` and ``div_scale`` multiply the CE and divergence token sums (the normalization).
    Returns ``(total, sums)``: the differentiable scaled total
    ``ce_scale * 0.5 * (ce_full + ce_masked) + div_scale * divergence_weight * divergence``
    (``ce_scale * ce_full`` without a masked pass) and the detached, unscaled ``LossSums``.
    ``on_full_logits(start, end, logits)`` receives each chunk's full-pass logits (for metrics) in
    the products' dtype; the view is reused for the gradient afterwards, so copy what you keep.
    """
    spec = divergence_spec(divergence)
    vocab = head_weight.shape[0] if head_weight is not None else rows_full.shape[-1]
    passes = 1 if rows_masked is None else 2
    plan = _ChunkPlan(
        targets, div_rows, ce_coef=float(ce_scale) * (0.5 if passes == 2 else 1.0),
        divergence_coef=float(div_scale) * float(divergence_weight), spec=spec, detach_full=detach_full,
        chunk_rows=chunk_rows or _chunk_rows_for(vocab, rows_full.shape[0], rows_full.device, passes),
        on_full_logits=on_full_logits)
    total, *sums = _ChunkedRemaskLoss.apply(rows_full, rows_masked, head_weight, head_bias, plan)
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
    divergence_weight = finite_number(weight, "remask_loss: weight", low=0.0)
    batch_idx, pos_idx, targets, div_rows = predicted_positions(labels, divergence_mask)
    n_ce = max(int((targets != IGNORE_INDEX).sum()), 1)
    n_div = max(int(div_rows.sum()), 1)
    total, sums = remask_loss_from_rows(
        logits_full[batch_idx, pos_idx], logits_masked[batch_idx, pos_idx], targets, div_rows,
        divergence_weight=divergence_weight, divergence=divergence, detach_full=detach_full,
        ce_scale=1.0 / n_ce, div_scale=1.0 / n_div)
    return {
        "total": total,
        "ce_full": sums.ce_full / n_ce,
        "ce_masked": sums.ce_masked / n_ce,
        "divergence": sums.divergence / n_div,
    }
