"""Helpers of the data-pipeline tests: expected role spans, written independently of the package."""

from __future__ import annotations

import itertools

import numpy as np

from composer_remask.batch import ROLE_NAMES
from tests.helpers.limits import CI_LIMIT_S

EOS = "<|endoftext|>"

# How long a test waits for a subprocess to reach a state. Never the reason a healthy run fails:
# the wait ends as soon as the state is reached (seconds), and the limit matches CI's own.
PATIENCE_S = CI_LIMIT_S


def decoded_spans(tokenizer, input_ids, token_roles) -> list[tuple[str, str]]:
    """(role name, decoded text) for each maximal run of one role, computed independently of the package."""
    spans = []
    position = 0
    for role, run in itertools.groupby(np.asarray(token_roles).tolist()):
        length = len(list(run))
        ids = np.asarray(input_ids)[position:position + length].tolist()
        spans.append((ROLE_NAMES[role], tokenizer.decode(ids, skip_special_tokens=False,
                                                         clean_up_tokenization_spaces=False)))
        position += length
    return spans


def expected_cot_spans(prompt: str, rationale: str, answer: str) -> list[tuple[str, str]]:
    return [("context", f"<|user|>\n{prompt}\n<|rationale|>\n"), ("rationale", f"{rationale}\n"),
            ("answer", f"<|answer|>\n{answer}{EOS}")]


def expected_chat_spans(exchanges: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Spans of a chat given its (user text, assistant text) exchanges, per docs/design.md#token-roles."""
    spans = []
    for index, (user, assistant) in enumerate(exchanges):
        opening = "<|user|>" if index == 0 else ""
        spans.append(("context", f"{opening}\n{user}\n<|assistant|>\n"))
        closing = "<|user|>" if index + 1 < len(exchanges) else EOS
        spans.append(("response", f"{assistant}\n{closing}"))
    return spans


def expected_spans_of_row(kind: str, row: dict) -> list[tuple[str, str]]:
    """What the round trip must give for one fixture row (texts in the fixtures need no stripping)."""
    if kind == "tinycot":
        return expected_cot_spans(row["prompt"], row["rationale"], row["target"])
    if kind == "reddit":
        user = f"{row['post_title']}\n\n{row['post_text']}" if row["post_text"] else row["post_title"]
        return expected_chat_spans([(user, row["comment_text"])])
    if "rationale" in row:
        return expected_cot_spans(row["prompt"], row["rationale"], row["answer"])
    if "response" in row:
        return expected_chat_spans([(row["prompt"], row["response"])])
    exchanges, pending = [], []
    for turn in row["messages"]:
        if turn["role"] == "assistant":
            exchanges.append(("\n\n".join(pending), turn["content"]))
            pending = []
        else:
            pending.append(turn["content"])
    return expected_chat_spans(exchanges)
