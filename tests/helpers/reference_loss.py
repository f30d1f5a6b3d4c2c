"""The ReMask loss by textbook formulas, written independently of the package (the tests' reference)."""

from __future__ import annotations

import torch


def reference_loss(logits_full, logits_masked, labels, weight, kind, divergence_mask=None, detach_full=False,
                   dtype=torch.float64):
    """Textbook formulas on full tensors, float64, no chunking and no gathering. ``dtype=torch.float32``:
    the same formulas in float32, whose distance from float64 measures float32's rounding of them."""
    lf = torch.log_softmax(logits_full.to(dtype)[:, :-1], -1)
    lm = torch.log_softmax(logits_masked.to(dtype)[:, :-1], -1)
    target = labels[:, 1:]
    valid = target != -100
    safe = target.clamp(min=0).unsqueeze(-1)
    ce_full = -lf.gather(-1, safe).squeeze(-1)[valid].mean()
    ce_masked = -lm.gather(-1, safe).squeeze(-1)[valid].mean()
    teacher = lf.detach() if detach_full else lf
    pf, pm = teacher.exp(), lm.exp()
    kl_fm = (pf * (teacher - lm)).sum(-1)
    kl_mf = (pm * (lm - teacher)).sum(-1)
    mix = torch.log(0.5 * (pf + pm))
    per_token = {
        "forward_kl": kl_fm,
        "reverse_kl": kl_mf,
        "sym_kl": 0.5 * (kl_fm + kl_mf),
        "js": 0.5 * (pf * (teacher - mix)).sum(-1) + 0.5 * (pm * (lm - mix)).sum(-1),
        "mse": ((teacher - lm) ** 2).mean(-1),
    }[kind]
    dmask = valid if divergence_mask is None else divergence_mask[:, 1:].bool()
    div = per_token[dmask].mean()
    total = 0.5 * (ce_full + ce_masked) + weight * div
    return {"total": total, "ce_full": ce_full, "ce_masked": ce_masked, "divergence": div}
