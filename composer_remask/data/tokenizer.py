"""Tokenizers: load one with ReMask's special tokens, add them to any HF tokenizer, train a tiny one offline.

Real recipes load a hub tokenizer (GPT-NeoX for StableLM). Tests and the CPU demo cannot download
anything, so they use a small byte-level BPE trained here on local text with `tokenizers`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from composer_remask.batch import REMASK_SPECIAL_TOKENS

EOS_TOKEN = "<|endoftext|>"


def add_remask_tokens(tokenizer: PreTrainedTokenizerBase) -> int:
    """Add the structural tags and ``<|mask|>`` as special tokens where missing; return how many.

    Special tokens are never split by the tokenizer and never produced by ``random`` replacement.
    A tokenizer without a pad token gets ``pad_token = eos_token`` (pads are never attended to
    nor predicted, so the id only has to exist).
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in REMASK_SPECIAL_TOKENS if t not in vocab]
    added = 0
    if missing:
        added = tokenizer.add_special_tokens(
            {"additional_special_tokens": list(missing)}, replace_additional_special_tokens=False)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return added


_add_special_tokens = add_remask_tokens  # shadowed inside load_tokenizer by its argument of the same name


def load_tokenizer(name: str, kwargs: Mapping[str, Any] | None = None,
                   add_remask_tokens: bool = True) -> PreTrainedTokenizerBase:
    """A Hugging Face tokenizer by hub name or local path, with ReMask's special tokens added.

    The one loader behind the corpus build, the training recipe's ``tokenizer:`` section and the
    llm-foundry glue. ``kwargs`` go to ``AutoTokenizer.from_pretrained`` (a fast tokenizer unless
    they say ``use_fast: false``). ``add_remask_tokens`` (default true) adds ``<|mask|>`` and the
    structural tags next to the tokenizer's own special tokens; the model's embeddings grow to fit.
    ``false`` keeps the tokenizer as it ships (``mask_strategy: random`` or ``pad`` need no mask
    token). A relative path is read from the working directory.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name, **dict(kwargs or {}))
    if add_remask_tokens:
        _add_special_tokens(tokenizer)
    return tokenizer


def train_tiny_tokenizer(
    texts: Iterable[str], vocab_size: int = 1024, with_remask_tokens: bool = True,
) -> PreTrainedTokenizerFast:
    """Train a deterministic byte-level BPE (GPT-NeoX style, EOS = BOS) on ``texts``.

    The result carries ReMask's special tokens unless ``with_remask_tokens`` is false.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(list(texts), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, unk_token=EOS_TOKEN,
        model_max_length=4096, clean_up_tokenization_spaces=False,
    )
    if with_remask_tokens:
        add_remask_tokens(tokenizer)
    return tokenizer
