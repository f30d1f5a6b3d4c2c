"""The batch contract shared by the data pipeline and the algorithm (see docs/design.md).

Everything that both sides must agree on lives here and nowhere else: token role ids, the
structural tags, the names of the batch keys and how loss-generating tokens are counted.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100

# Token roles (int8 in batches and MDS shards).
ROLE_PAD = -1
ROLE_CONTEXT = 0
ROLE_RESPONSE = 1
ROLE_RATIONALE = 2
ROLE_ANSWER = 3
ROLE_NAMES = {ROLE_PAD: "pad", ROLE_CONTEXT: "context", ROLE_RESPONSE: "response",
              ROLE_RATIONALE: "rationale", ROLE_ANSWER: "answer"}
PREDICTED_ROLES = (ROLE_RESPONSE, ROLE_RATIONALE, ROLE_ANSWER)
MASKABLE_ROLES = (ROLE_RESPONSE, ROLE_RATIONALE)

# Structural tags: never replaced by the mask, added as special tokens to the tokenizer.
USER_TAG = "<|user|>"
ASSISTANT_TAG = "<|assistant|>"
RATIONALE_TAG = "<|rationale|>"
ANSWER_TAG = "<|answer|>"
MASK_TOKEN = "<|mask|>"
STRUCTURAL_TAGS = (USER_TAG, ASSISTANT_TAG, RATIONALE_TAG, ANSWER_TAG)
REMASK_SPECIAL_TOKENS = (*STRUCTURAL_TAGS, MASK_TOKEN)

# Batch keys produced by the collator (input_ids, attention_mask, labels are Hugging Face's).
TOKEN_ROLES_KEY = "token_roles"


# Added by ReMask when it prepares a batch (Event.BATCH_START); Composer splits them with the batch.
DIVERGENCE_MASK_KEY = "remask_divergence_mask"  # positions predicted before the ReMask-CoT label rules
MASKED_INPUT_IDS_KEY = "remask_masked_input_ids"  # input of the masked pass (absent with one pass)
MASKED_ONLY_INPUT_IDS_KEY = "remask_masked_only_input_ids"  # input of the only pass (masked-only objective)
SAMPLE_KEYS_KEY = "remask_sample_keys"  # (B,) int64: each row's content key, to see a changed microbatch
ROW_COUNTS_KEY = "remask_row_counts"  # (B, 2): each row's CE and divergence token counts, likewise
PREPARED_KEYS = (DIVERGENCE_MASK_KEY, MASKED_INPUT_IDS_KEY, MASKED_ONLY_INPUT_IDS_KEY, SAMPLE_KEYS_KEY, ROW_COUNTS_KEY)

# How a prepared microbatch runs through the model: the full rows only (SFT), full and masked rows
# in one forward (ReMask, and the card's run without the divergence), or the masked rows only
# (Masked Thought as its paper trains it: one pass on the masked input, CE against the labels).
LAYOUT_FULL = "full"
LAYOUT_FULL_AND_MASKED = "full+masked"
LAYOUT_MASKED_ONLY = "masked"
LAYOUTS = (LAYOUT_FULL, LAYOUT_FULL_AND_MASKED, LAYOUT_MASKED_ONLY)


def tokenizer_pad_id(tokenizer) -> int | None:
    """The id that pads a batch: the tokenizer's pad token, else its EOS (pads are never attended nor
    predicted, so the id only has to exist); ``None`` when it has neither."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def num_loss_tokens(labels: torch.Tensor) -> int:
    """Positions that generate a loss once labels are shifted (labels[:, 1:] != -100)."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum().item())


def batch_loss_tokens(batch) -> int:
    """Loss-generating tokens of a batch, as Composer should weight its microbatches.

    Counts the positions ReMask's loss covers: the predicted positions before ReMask-CoT dropped
    any label when ReMask has marked them, else the labelled ones. The project's DataSpec and
    ReMask's ``loss_weighting="tokens"`` both count with this function, so
    ``accumulate_train_batch_on_tokens=True`` weights microbatches exactly as the loss does.
    """
    mask = batch.get(DIVERGENCE_MASK_KEY)
    if mask is not None:
        return int(mask[..., 1:].sum().item())
    return num_loss_tokens(batch["labels"])


def row_counts(labels: torch.Tensor, divergence_mask: torch.Tensor) -> torch.Tensor:
    """Per row: predicted positions with a label, and positions the divergence covers (B x 2, int64)."""
    return torch.stack([(labels[..., 1:] != IGNORE_INDEX).sum(-1), divergence_mask[..., 1:].sum(-1)], dim=-1).long()


def forward_passes(batch) -> int:
    """Forward+backward passes ReMask runs on this (prepared) batch: 2 with a second, masked pass, else 1
    (also for the masked-only objective, whose single pass runs on the masked input).

    The seam for FLOP counting: ``flops_per_batch`` of one pass times this counts what ran.
    """
    return 2 if hasattr(batch, "get") and batch.get(MASKED_INPUT_IDS_KEY) is not None else 1
