"""The honest baseline: ReMask written the straightforward way, kept only for benchmarks.

Two separate forward calls, the Hugging Face loss for both cross-entropies, and an fp32
``log_softmax`` of the full logits at every position for the divergence. Same objective as
``composer_remask.ReMask`` without the ReMask-CoT label rules (mask 0.4, symmetric KL, weight
0.1), none of its economies.
"""

from __future__ import annotations

import torch
from composer.core import Algorithm, Event, State
from composer.core.precision import get_precision_context
from composer.loggers import Logger

from composer_remask.batch import IGNORE_INDEX, MASKABLE_ROLES


class NaiveReMask(Algorithm):
    def __init__(self, mask_token_id: int, protected_ids: list[int], mask_prob: float = 0.4, weight: float = 0.1):
        self.mask_token_id = mask_token_id
        self.protected_ids = torch.tensor(protected_ids)
        self.mask_prob = mask_prob
        self.weight = weight

    def match(self, event: Event, state: State) -> bool:
        return event == Event.AFTER_LOSS

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        batch = state.batch
        ids, labels = batch["input_ids"], batch["labels"]
        roles = batch["token_roles"]
        maskable = torch.isin(roles, torch.tensor(MASKABLE_ROLES, dtype=roles.dtype, device=roles.device))
        maskable &= ~torch.isin(ids, self.protected_ids.to(ids.device))
        mask = maskable & (torch.rand(ids.shape, device=ids.device) < self.mask_prob)
        masked_batch = {**batch, "input_ids": ids.masked_fill(mask, self.mask_token_id)}
        with get_precision_context(state.precision, state.precision_config):
            masked_out = state.model(masked_batch)  # second forward call, HF loss again
        ce_full, ce_masked = state.loss, masked_out.loss
        logp_full = torch.log_softmax(state.outputs.logits.float(), dim=-1)[:, :-1]
        logp_masked = torch.log_softmax(masked_out.logits.float(), dim=-1)[:, :-1]
        predicted = labels[:, 1:] != IGNORE_INDEX
        kl_fm = (logp_full.exp() * (logp_full - logp_masked)).sum(-1)
        kl_mf = (logp_masked.exp() * (logp_masked - logp_full)).sum(-1)
        divergence = (0.5 * (kl_fm + kl_mf))[predicted].mean()
        total = 0.5 * (ce_full + ce_masked) + self.weight * divergence
        state.loss = {"total": total, "ce_full": ce_full, "ce_masked": ce_masked, "divergence": divergence}
