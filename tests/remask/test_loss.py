"""The ReMask loss against a plain, independent float64 computation (``reference_loss``)."""

from __future__ import annotations

import math

import pytest
import torch

from composer_remask import remask_loss
from composer_remask.remask.divergences import DIVERGENCE_SPECS, DIVERGENCES, DivergenceSpec
from composer_remask.remask.loss import LossSums, predicted_positions, remask_loss_from_rows
from tests.helpers.reference_loss import reference_loss
from tests.helpers.tolerances import ROUNDING_GROWTH, float32_rounding_bound, measured_floor


def float64_reference_and_floors(build):
    """``build(dtype)`` -> (values, gradients) of a reference computation in ``dtype``. Returns the
    float64 values and gradients and float32's rounding of each, |float32 - float64| (``measured_floor``):
    ReMask's float32 result must be within ``ROUNDING_GROWTH`` times that of the float64 one."""
    (v32, g32), (v64, g64) = build(torch.float32), build(torch.float64)
    return v64, g64, {k: measured_floor(v32[k], v64[k]) for k in v64}, [measured_floor(a, b) for a, b in zip(g32, g64)]


def reference_on_logits(logits, labels, *args, **kwargs):
    """``float64_reference_and_floors`` of ``reference_loss`` on ``logits`` (gradients wrt the logits)."""
    def build(dtype):
        inputs = [x.detach().to(dtype).requires_grad_() for x in logits]
        ref = reference_loss(*inputs, labels, *args, dtype=dtype, **kwargs)
        ref["total"].backward()
        return {k: v.item() for k, v in ref.items()}, [x.grad for x in inputs]

    return float64_reference_and_floors(build)


def reference_on_head(hidden_full, hidden_masked, head, labels, *args, **kwargs):
    """The same on the logits of ``head`` (gradients wrt both hidden states, the weight and the bias)."""
    def build(dtype):
        inputs = [x.detach().to(dtype).requires_grad_() for x in (hidden_full, hidden_masked, head.weight, head.bias)]
        logits = [torch.nn.functional.linear(h, *inputs[2:]) for h in inputs[:2]]
        ref = reference_loss(*logits, labels, *args, dtype=dtype, **kwargs)
        ref["total"].backward()
        return {k: v.item() for k, v in ref.items()}, [x.grad for x in inputs]

    return float64_reference_and_floors(build)


def assert_within(value, reference, floor, what=""):
    assert abs(value - reference) <= ROUNDING_GROWTH * floor, f"{what}: {value} vs {reference}, floor {floor:.2e}"


def make_case(dtype=torch.float32, seed=0, batch=3, seq=9, vocab=37):
    g = torch.Generator().manual_seed(seed)
    logits_full = (torch.randn(batch, seq, vocab, generator=g) * 2).to(dtype)
    logits_masked = (logits_full.float() + torch.randn(batch, seq, vocab, generator=g)).to(dtype)
    labels = torch.randint(vocab, (batch, seq), generator=g)
    labels[:, :3] = -100  # prompt
    labels[1, 6:] = -100  # padding at the end of row 1
    labels[2, 4] = -100  # a dropped rationale label in the middle
    return logits_full, logits_masked, labels


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_and_gradients_match_reference(kind, dtype):
    logits_full, logits_masked, labels = make_case(dtype)
    ours_full = logits_full.clone().requires_grad_()
    ours_masked = logits_masked.clone().requires_grad_()
    out = remask_loss(ours_full, ours_masked, labels, weight=0.3, divergence=kind)
    out["total"].backward()
    ref, ref_grads, floors, grad_floors = reference_on_logits((logits_full, logits_masked), labels, 0.3, kind)

    for key in ("total", "ce_full", "ce_masked", "divergence"):
        assert out[key].dtype == torch.float32  # fp32 whatever the logits' dtype
        assert_within(out[key].item(), ref[key], floors[key], key)
    # Gradients come back in the logits' dtype: bfloat16 rounds each once more (eps relative).
    rtol = 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps
    for mine, theirs, floor in zip((ours_full.grad, ours_masked.grad), ref_grads, grad_floors):
        torch.testing.assert_close(mine.double(), theirs, atol=ROUNDING_GROWTH * floor, rtol=rtol)


def test_total_identity_and_divergence_mask():
    logits_full, logits_masked, labels = make_case(seed=1)
    divergence_mask = labels != -100
    divergence_mask[2, 4] = True  # the dropped label still counts for the divergence
    out = remask_loss(logits_full, logits_masked, labels, weight=0.1, divergence_mask=divergence_mask)
    ref, _, floors, _ = reference_on_logits((logits_full, logits_masked), labels, 0.1, "sym_kl", divergence_mask)
    assert_within(out["divergence"].item(), ref["divergence"], floors["divergence"], "divergence")
    identity = 0.5 * (out["ce_full"] + out["ce_masked"]) + 0.1 * out["divergence"]
    # Each side is 0.5 (a + b) + w c in float32: 4 roundings each, of at most the largest term.
    assert abs(out["total"].item() - identity.item()) <= float32_rounding_bound(
        max(abs(out[k].item()) for k in ("ce_full", "ce_masked", "divergence", "total")), 2 * 4)


def test_detach_full_stops_divergence_gradient_only():
    logits_full, logits_masked, labels = make_case(seed=2)
    ours_full = logits_full.clone().requires_grad_()
    remask_loss(ours_full, logits_masked, labels, weight=1.0, detach_full=True)["total"].backward()
    _, ref_grads, _, grad_floors = reference_on_logits((logits_full, logits_masked), labels, 1.0, "sym_kl",
                                                       detach_full=True)
    torch.testing.assert_close(ours_full.grad.double(), ref_grads[0], atol=ROUNDING_GROWTH * grad_floors[0], rtol=0)


def test_identical_inputs_have_zero_divergence():
    logits_full, _, labels = make_case(seed=3)
    for kind in DIVERGENCES:
        out = remask_loss(logits_full, logits_full.clone(), labels, divergence=kind)
        # Zero up to float32 rounding: each of the vocabulary's terms p (log p - log q) rounds by ~4 ulps of
        # |log p|, weighted by p (at most 4 ulps of the entropy, <= log V); their sum adds V ulps of twice that.
        vocab = logits_full.shape[-1]
        assert abs(out["divergence"].item()) <= float32_rounding_bound(math.log(vocab), 4 + 2 * vocab)
        assert out["ce_full"].item() == out["ce_masked"].item()  # bit-exact: the same kernels on equal inputs


def test_hidden_state_path_equals_logits_path_in_chunks():
    """Projecting gathered hidden states chunk by chunk gives the loss and gradients of the logits."""
    g = torch.Generator().manual_seed(4)
    hidden_full = torch.randn(2, 7, 8, generator=g, requires_grad=True)
    hidden_masked = torch.randn(2, 7, 8, generator=g, requires_grad=True)
    head = torch.nn.Linear(8, 29, bias=True)
    labels = torch.randint(29, (2, 7), generator=g)
    labels[:, :2] = -100
    b, t, targets, div_rows = predicted_positions(labels, None)
    n = int((targets != -100).sum())
    total, sums = remask_loss_from_rows(
        hidden_full[b, t], hidden_masked[b, t], targets, div_rows, divergence_weight=0.2, divergence="sym_kl",
        detach_full=False, ce_scale=1 / n, div_scale=1 / n, head_weight=head.weight, head_bias=head.bias,
        chunk_rows=3)
    total.backward()
    ours = [hidden_full.grad.clone(), hidden_masked.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]
    for p in (hidden_full, hidden_masked, head.weight, head.bias):
        p.grad = None
    ref = remask_loss(head(hidden_full), head(hidden_masked), labels, weight=0.2)
    ref["total"].backward()
    # Two float32 routes to one loss: each within float32's rounding of the formulas, measured in float64.
    _, _, floors, grad_floors = reference_on_head(hidden_full, hidden_masked, head, labels, 0.2, "sym_kl")
    assert_within(total.item(), ref["total"].item(), 2 * floors["total"], "total")
    assert isinstance(sums, LossSums)
    for key in ("ce_full", "ce_masked", "divergence"):
        assert_within((getattr(sums, key) / n).item(), ref[key].item(), 2 * floors[key], key)
    for mine, theirs, floor in zip(ours, [hidden_full.grad, hidden_masked.grad, head.weight.grad, head.bias.grad],
                                   grad_floors):
        torch.testing.assert_close(mine, theirs, atol=2 * ROUNDING_GROWTH * floor, rtol=0)


def test_no_labelled_position_gives_zero_finite_loss_with_gradient():
    logits_full, logits_masked, labels = make_case(seed=5)
    labels[:] = -100
    logits_full.requires_grad_()
    out = remask_loss(logits_full, logits_masked, labels)
    out["total"].backward()
    assert out["total"].item() == 0.0
    assert torch.isfinite(logits_full.grad).all() and logits_full.grad.abs().sum() == 0


def test_shape_mismatch_is_a_clear_error():
    logits_full, logits_masked, labels = make_case()
    with pytest.raises(ValueError, match="same shape"):
        remask_loss(logits_full, logits_masked[:, :-1], labels)
    with pytest.raises(ValueError, match="unknown divergence"):
        remask_loss(logits_full, logits_masked, labels, divergence="kl")


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("detach_full", [False, True])
def test_gradients_with_partial_divergence_mask(kind, detach_full):
    logits_full, logits_masked, labels = make_case(seed=6)
    divergence_mask = labels != -100
    divergence_mask[0, 5] = False  # a labelled position outside the divergence
    divergence_mask[1, 7] = True  # a divergence position without a label
    ours = [logits_full.clone().requires_grad_(), logits_masked.clone().requires_grad_()]
    out = remask_loss(*ours, labels, weight=0.7, divergence=kind, divergence_mask=divergence_mask,
                      detach_full=detach_full)
    out["total"].backward()
    ref, ref_grads, floors, grad_floors = reference_on_logits((logits_full, logits_masked), labels, 0.7, kind,
                                                              divergence_mask, detach_full)
    assert_within(out["total"].item(), ref["total"], floors["total"], "total")
    for mine, theirs, floor in zip(ours, ref_grads, grad_floors):
        torch.testing.assert_close(mine.grad.double(), theirs, atol=ROUNDING_GROWTH * floor, rtol=0)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_extreme_logits_stay_finite(kind):
    logits_full, logits_masked, labels = make_case(seed=7)
    logits_full = logits_full * 60  # log-probabilities far below fp32's exp range
    logits_masked = -logits_masked * 60
    inputs = [logits_full.requires_grad_(), logits_masked.requires_grad_()]
    out = remask_loss(*inputs, labels, divergence=kind)
    out["total"].backward()
    assert all(torch.isfinite(v) for v in out.values())
    assert all(torch.isfinite(t.grad).all() for t in inputs)


def _hidden_case(seed=8, hidden=8, vocab=29):
    g = torch.Generator().manual_seed(seed)
    hidden_full = torch.randn(2, 7, hidden, generator=g)
    hidden_masked = hidden_full + 0.5 * torch.randn(2, 7, hidden, generator=g)
    head = torch.nn.Linear(hidden, vocab, bias=True)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=g))
        head.bias.copy_(torch.randn(vocab, generator=g))
    labels = torch.randint(vocab, (2, 7), generator=g)
    labels[:, :2] = -100
    divergence_mask = labels != -100
    divergence_mask[1, 3] = True  # a divergence-only row
    return hidden_full, hidden_masked, head, labels, divergence_mask


def _rows_loss_and_grads(kind, detach_full, chunk_rows=3, seed=8):
    hidden_full, hidden_masked, head, labels, divergence_mask = _hidden_case(seed)
    b, t, targets, div_rows = predicted_positions(labels, divergence_mask)
    inputs = [hidden_full[b, t].requires_grad_(), hidden_masked[b, t].requires_grad_(), head.weight, head.bias]
    total, sums = remask_loss_from_rows(
        inputs[0], inputs[1], targets, div_rows, divergence_weight=0.6, divergence=kind, detach_full=detach_full,
        ce_scale=0.25, div_scale=0.5, head_weight=head.weight, head_bias=head.bias, chunk_rows=chunk_rows)
    total.backward()
    return total.detach(), sums, [p.grad.clone() for p in inputs]


@pytest.mark.parametrize("kind", [k for k, spec in DIVERGENCE_SPECS.items() if spec.closed_form is not None])
@pytest.mark.parametrize("detach_full", [False, True])
def test_closed_forms_equal_the_autograd_fallback(kind, detach_full, monkeypatch):
    """A divergence's closed-form gradient is the one autograd finds on its per-token function."""
    closed = _rows_loss_and_grads(kind, detach_full)
    monkeypatch.setitem(DIVERGENCE_SPECS, kind, DivergenceSpec(DIVERGENCE_SPECS[kind].per_token))
    fallback = _rows_loss_and_grads(kind, detach_full)
    # Two float32 routes to the same formulas: each within float32's relative rounding of them, measured
    # in float64 on the same rows (the reference takes means where these take fixed scales: relative floors).
    hidden_full, hidden_masked, head, labels, divergence_mask = _hidden_case(8)
    ref, ref_grads, floors, grad_floors = reference_on_head(hidden_full, hidden_masked, head, labels, 0.6, kind,
                                                            divergence_mask, detach_full)
    relative = {k: floors[k] / abs(ref[k]) for k in ref}
    assert_within(closed[0].item(), fallback[0].item(), 2 * relative["total"] * abs(fallback[0].item()), "total")
    for key, mine, theirs in zip(LossSums._fields, closed[1], fallback[1]):
        assert_within(mine.item(), theirs.item(), 2 * relative[key] * abs(theirs.item()), key)
    for mine, theirs, floor, grad in zip(closed[2], fallback[2], grad_floors, ref_grads):
        atol = 2 * ROUNDING_GROWTH * floor / float(grad.abs().max()) * float(theirs.abs().max())
        torch.testing.assert_close(mine, theirs, atol=atol, rtol=0)


def test_a_new_divergence_is_one_function_and_one_row(monkeypatch):
    """Registering only a per-token function trains through per-chunk autograd, exactly."""
    def total_variation(logp_full, logp_masked):
        return 0.5 * (logp_full.exp() - logp_masked.exp()).abs().sum(-1)

    monkeypatch.setitem(DIVERGENCE_SPECS, "tv", DivergenceSpec(total_variation))
    logits_full, logits_masked, labels = make_case(seed=9)
    ours = [logits_full.clone().requires_grad_(), logits_masked.clone().requires_grad_()]
    out = remask_loss(*ours, labels, weight=0.5, divergence="tv")
    out["total"].backward()

    def build(dtype):
        ref_in = [logits_full.detach().to(dtype).requires_grad_(), logits_masked.detach().to(dtype).requires_grad_()]
        lf, lm = (torch.log_softmax(x[:, :-1], -1) for x in ref_in)
        valid = labels[:, 1:] != -100
        safe = labels[:, 1:].clamp(min=0).unsqueeze(-1)
        ce = [-lp.gather(-1, safe).squeeze(-1)[valid].mean() for lp in (lf, lm)]
        div = total_variation(lf, lm)[valid].mean()
        ref_total = 0.5 * (ce[0] + ce[1]) + 0.5 * div
        ref_total.backward()
        return {"divergence": div.item(), "total": ref_total.item()}, [x.grad for x in ref_in]

    ref, ref_grads, floors, grad_floors = float64_reference_and_floors(build)
    assert_within(out["divergence"].item(), ref["divergence"], floors["divergence"], "divergence")
    assert_within(out["total"].item(), ref["total"], floors["total"], "total")
    for mine, theirs, floor in zip(ours, ref_grads, grad_floors):
        torch.testing.assert_close(mine.grad.double(), theirs, atol=ROUNDING_GROWTH * floor, rtol=0)


def test_single_pass_is_the_full_cross_entropy():
    hidden_full, _, head, labels, _ = _hidden_case(seed=10)
    b, t, targets, div_rows = predicted_positions(labels, None)
    rows = hidden_full[b, t].requires_grad_()
    n = int((targets != -100).sum())
    total, sums = remask_loss_from_rows(rows, None, targets, div_rows, divergence_weight=0.3, divergence="sym_kl",
                                        detach_full=False, ce_scale=1 / n, div_scale=1 / n,
                                        head_weight=head.weight, head_bias=head.bias, chunk_rows=4)
    total.backward()

    def build(dtype):
        ref_rows = hidden_full[b, t].detach().to(dtype).requires_grad_()
        ref = torch.nn.functional.cross_entropy(ref_rows @ head.weight.to(dtype).t() + head.bias.to(dtype), targets)
        ref.backward()
        return {"total": ref.item()}, [ref_rows.grad]

    ref, (ref_grad,), floors, (grad_floor,) = float64_reference_and_floors(build)
    assert_within(total.item(), ref["total"], floors["total"], "total")
    assert sums.ce_masked.item() == 0.0 and sums.divergence.item() == 0.0
    torch.testing.assert_close(rows.grad.double(), ref_grad, atol=ROUNDING_GROWTH * grad_floor, rtol=0)


def test_under_autocast_the_head_runs_in_bf16_with_fp32_sums_and_accumulators():
    """Autocast's dtype drives the products; sums and the output layer's gradient stay fp32."""
    hidden_full, hidden_masked, head, labels, divergence_mask = _hidden_case(seed=12, hidden=16, vocab=61)
    b, t, targets, div_rows = predicted_positions(labels, divergence_mask)
    seen_dtypes = []

    def run(autocast):
        rows = [hidden_full[b, t].clone().requires_grad_(), hidden_masked[b, t].clone().requires_grad_()]
        for p in head.parameters():
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            total, sums = remask_loss_from_rows(
                *rows, targets, div_rows, divergence_weight=0.5, divergence="sym_kl", detach_full=False,
                ce_scale=0.1, div_scale=0.1, head_weight=head.weight, head_bias=head.bias, chunk_rows=4,
                on_full_logits=lambda start, end, logits: seen_dtypes.append(logits.dtype))
        total.backward()
        return total, sums, [r.grad for r in rows] + [head.weight.grad.clone(), head.bias.grad.clone()]

    low_total, low_sums, low_grads = run(autocast=True)
    assert set(seen_dtypes) == {torch.bfloat16}
    assert low_total.dtype == torch.float32 and all(s.dtype == torch.float32 for s in low_sums)
    assert head.weight.grad.dtype == torch.float32
    seen_dtypes.clear()
    total, _, grads = run(autocast=False)
    assert set(seen_dtypes) == {torch.float32}
    # Not an exactness check: bf16 is near fp32. Each bf16 logit rounds its bf16-rounded inputs' products,
    # ~2 bf16 eps of its size; the loss moves by about that (seen: 0.1 eps), its gradients by a few times
    # that of the largest (seen: 2 eps on one CPU): 2 and 8 eps leave room for other kernels.
    bf16_eps = torch.finfo(torch.bfloat16).eps
    assert low_total.item() == pytest.approx(total.item(), rel=2 * bf16_eps, abs=0)
    for low, full in zip(low_grads, grads):
        torch.testing.assert_close(low, full, atol=8 * bf16_eps * float(full.abs().max()), rtol=0)


def test_a_second_backward_through_the_same_loss_is_a_clear_error():
    logits_full, logits_masked, labels = make_case(seed=13)
    logits_full.requires_grad_()
    out = remask_loss(logits_full, logits_masked, labels)
    out["total"].backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        out["total"].backward()


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("detach_full", [False, True])
@pytest.mark.parametrize("block_elements", [1, 3 * 2 * 29])
def test_chunks_and_cache_blocks_of_any_size_give_the_reference(kind, detach_full, block_elements, monkeypatch):
    """Hidden rows through a biased head, split in chunks of 3 rows and elementwise blocks of 1 or 3 rows."""
    import composer_remask.remask.loss as loss_module

    monkeypatch.setattr(loss_module, "_BLOCK_ELEMENTS", block_elements)
    hidden_full, hidden_masked, head, labels, divergence_mask = _hidden_case(seed=14)
    b, t, targets, div_rows = predicted_positions(labels, divergence_mask)
    n_ce, n_div = int((targets != -100).sum()), int(div_rows.sum())
    ours = [hidden_full[b, t].requires_grad_(), hidden_masked[b, t].requires_grad_()]
    total, sums = remask_loss_from_rows(
        *ours, targets, div_rows, divergence_weight=0.7, divergence=kind, detach_full=detach_full,
        ce_scale=1 / n_ce, div_scale=1 / n_div, head_weight=head.weight, head_bias=head.bias, chunk_rows=3)
    total.backward()
    mine = [p.grad for p in ours] + [head.weight.grad, head.bias.grad]

    ref, ref_grads, floors, grad_floors = reference_on_head(hidden_full, hidden_masked, head, labels, 0.7, kind,
                                                            divergence_mask, detach_full)
    assert_within(total.item(), ref["total"], floors["total"], "total")
    assert_within((sums.divergence / n_div).item(), ref["divergence"], floors["divergence"], "divergence")
    # The hidden-state gradients of the predicted rows (the others are zero in both).
    theirs = [ref_grads[0][b, t], ref_grads[1][b, t], ref_grads[2], ref_grads[3]]
    for m, r, floor in zip(mine, theirs, [grad_floors[0], grad_floors[1], grad_floors[2], grad_floors[3]]):
        torch.testing.assert_close(m.double(), r, atol=ROUNDING_GROWTH * floor, rtol=0)
