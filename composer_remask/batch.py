"""The batch contract shared by the data pipeline and the algorithm (DESIGN §2-§3).

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


# Added by ReMask at AFTER_DATALOADER: positions predicted before the ReMask-CoT label rules.
DIVERGENCE_MASK_KEY = "remask_divergence_mask"


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
