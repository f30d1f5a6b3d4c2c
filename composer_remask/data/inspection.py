"""Show built samples as role-labelled spans, so a person can check formats and roles at a glance."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import numpy as np

from composer_remask.batch import ROLE_NAMES

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_LABEL_WIDTH = max(len(name) for name in ROLE_NAMES.values())


def role_spans(token_roles: np.ndarray) -> list[tuple[int, int, int]]:
    """Maximal runs of one role as ``(role, start, end)``."""
    roles = np.asarray(token_roles)
    if roles.size == 0:
        return []
    starts = np.flatnonzero(np.r_[True, roles[1:] != roles[:-1]])
    ends = np.r_[starts[1:], roles.size]
    return [(int(roles[s]), int(s), int(e)) for s, e in zip(starts, ends)]


def _visible_lines(text: str) -> list[str]:
    """Split at newlines, keeping a visible ``\\n`` marker; tabs and CRs shown escaped."""
    shown = text.replace("\r", "\\r").replace("\t", "\\t")
    lines = [line + "\\n" for line in shown.split("\n")]
    lines[-1] = lines[-1][:-2]
    return lines if lines[-1] else lines[:-1]


def describe_sample(input_ids: np.ndarray, token_roles: np.ndarray, tokenizer: PreTrainedTokenizerBase,
                    title: str) -> str:
    """One sample: a header with token counts per role, then each role span decoded on its own."""
    counts = {ROLE_NAMES[role]: int(n) for role, n in zip(*np.unique(token_roles, return_counts=True))}
    header = f"--- {title}: {len(input_ids)} tokens (" + ", ".join(f"{k} {v}" for k, v in counts.items()) + ") ---"
    out = [header]
    for role, start, end in role_spans(token_roles):
        text = tokenizer.decode(input_ids[start:end].tolist(), skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)
        for i, line in enumerate(_visible_lines(text) or [""]):
            label = ROLE_NAMES[role] if i == 0 else ""
            out.append(f"{label:<{_LABEL_WIDTH}} | {line}")
    return "\n".join(out)


def inspect_corpus(out_dir: str, n: int = 3, source: str | None = None,
                   tokenizer: PreTrainedTokenizerBase | str | None = None) -> str:
    """A readable report of a built corpus: manifest counts, then ``n`` decoded samples per source.

    Every shard file of the sources shown is first checked against ``index.json`` (the
    decompressed file where training would read one): a corrupt shard raises
    ``ShardIntegrityError`` naming it. The tokenizer defaults to the one recorded in the
    manifest (its folder, else its name).
    """
    from composer_remask.data.manifest import MANIFEST_NAME, vocabulary_hash
    from composer_remask.data.shards import read_mds_samples, verify_shards_on_disk
    from composer_remask.data.tokenizer import load_tokenizer

    with open(os.path.join(out_dir, MANIFEST_NAME)) as f:
        manifest = json.load(f)
    recorded = manifest["tokenizer"]
    if tokenizer is None:
        local_dir = recorded.get("local_dir")
        tokenizer = local_dir if local_dir and os.path.isdir(local_dir) else recorded["name"]
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    names = list(manifest["sources"])
    if source is not None:
        if source not in names:
            raise ValueError(f"no source {source!r} in {out_dir}; sources: {names}")
        names = [source]
    lines = [f"{out_dir}: max_seq_len {manifest['max_seq_len']}, tokenizer {recorded['name']}"]
    if vocabulary_hash(tokenizer) != recorded["vocab_sha256"]:
        lines.append("WARNING: this tokenizer's vocabulary differs from the one the corpus was built with")
    for name in names:
        verify_shards_on_disk(os.path.join(out_dir, name))
    for name in names:
        stats = manifest["sources"][name]
        skipped = ", ".join(f"{reason} {count}" for reason, count in stats["rows_skipped"].items()) or "none"
        tokens = stats["tokens"]
        per_role = ", ".join(f"{role} {count}" for role, count in tokens.items() if role != "total" and count)
        lines.append(f"{name}: {stats['rows_written']} of {stats['rows_read']} rows written "
                     f"(skipped: {skipped}; truncated {stats['rows_truncated']}); "
                     f"{tokens['total']} tokens ({per_role}); shards match index.json")
    for name in names:
        for index, sample in enumerate(read_mds_samples(os.path.join(out_dir, name), limit=n)):
            lines.append("")
            lines.append(describe_sample(sample["input_ids"], sample["token_roles"], tokenizer,
                                         f"{name} #{index}"))
    return "\n".join(lines) + "\n"
