"""Prompt formats and token roles: an example becomes (input_ids, token_roles).

See docs/design.md#formats and docs/design.md#token-roles.

Two templates, built from the structural tags of ``batch.py`` and the tokenizer's EOS (no BOS):

Chat (one block per exchange)::

    <|user|>\\n{user text}\\n<|assistant|>\\n{assistant text}\\n   ...   <EOS>

CoT::

    <|user|>\\n{prompt}\\n<|rationale|>\\n{rationale}\\n<|answer|>\\n{answer}<EOS>

Roles, token by token:

- CONTEXT: the first ``<|user|>``, user and system text with the newlines around it, and the tags that
  open a reply (``<|assistant|>\\n``, ``<|rationale|>\\n``).
- RESPONSE: assistant text and its trailing ``\\n``, plus the tag that closes the assistant turn (the
  next ``<|user|>`` mid-conversation, or the final EOS): the model must learn to end its turn, and
  a special token is never replaced by the mask.
- RATIONALE: rationale text and its trailing ``\\n``.
- ANSWER: ``<|answer|>``, its ``\\n``, the answer text and the final EOS.

System messages are context: every run of system/user messages before an assistant turn becomes
that exchange's user text, joined by a blank line in their order (so a leading system prompt reads
``<|user|>\\n{system}\\n\\n{user}\\n``). Every assistant turn of a multi-turn chat is a response.

Texts are stripped of surrounding whitespace. Each piece of text between two role changes is
tokenized on its own, so role boundaries are exact at the token level; with stripped text and a
GPT-2/NeoX-style byte-level pre-tokenizer this gives the same ids as tokenizing the whole rendered
string (``RoleEncoder`` warns when a tokenizer does not). Tags that appear *inside* user text are
tokenized as plain text, never as structural tokens.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from composer_remask.batch import (
    ANSWER_TAG,
    ASSISTANT_TAG,
    PREDICTED_ROLES,
    RATIONALE_TAG,
    ROLE_ANSWER,
    ROLE_CONTEXT,
    ROLE_RATIONALE,
    ROLE_RESPONSE,
    STRUCTURAL_TAGS,
    USER_TAG,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

EOS = "<eos>"  # placeholder for the tokenizer's own EOS token inside segments
CHAT_ROLES = ("system", "user", "assistant")

# Outcomes of fitting an encoded example into max_seq_len.
FIT_KEPT = "kept"
FIT_TRUNCATED = "truncated"
DROP_TOO_LONG_NO_PREDICTED = "too_long_no_predicted"
DROP_TOO_LONG_ANSWER = "too_long_answer"


@dataclass(frozen=True)
class ChatExample:
    """A conversation of ``(role, text)`` turns, roles in ``CHAT_ROLES``, ending with the assistant."""

    turns: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class CoTExample:
    """A chain-of-thought example: prompt, reasoning, final answer."""

    prompt: str
    rationale: str
    answer: str


Example = ChatExample | CoTExample


@dataclass(frozen=True)
class Segment:
    """A run of one role: either text to tokenize or one special token (a tag or ``EOS``)."""

    role: int
    text: str = ""
    special: str | None = None


class FormatError(ValueError):
    """An example that cannot be rendered; ``reason`` is a short key, ``turn`` the offending index."""

    def __init__(self, reason: str, message: str, turn: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.turn = turn


def _clean(text: str, what: str, turn: int | None = None) -> str:
    stripped = text.strip()
    if not stripped:
        raise FormatError("empty_text", f"{what} is empty", turn)
    return stripped


def chat_exchanges(turns: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Group turns into (user text, assistant text) exchanges, merging system/user runs.

    Raises FormatError for an unknown role, empty text, a chat that starts with the assistant,
    two assistant turns in a row, or a last turn that is not the assistant's.
    """
    if not turns:
        raise FormatError("empty_text", "conversation has no turns")
    exchanges: list[tuple[str, str]] = []
    pending: list[str] = []
    for index, (role, text) in enumerate(turns):
        if role not in CHAT_ROLES:
            raise FormatError("unknown_role", f"role {role!r} is not one of {CHAT_ROLES}", index)
        cleaned = _clean(text, f"{role} turn", index)
        if role == "assistant":
            if not pending:
                what = "conversation starts" if index == 0 else "two assistant turns in a row"
                raise FormatError("bad_turn_order", f"{what}: an assistant turn needs a user turn "
                                  "before it", index)
            exchanges.append(("\n\n".join(pending), cleaned))
            pending = []
        else:
            pending.append(cleaned)
    if pending:
        raise FormatError("last_turn_not_assistant", "the last turn must be the assistant's",
                          len(turns) - 1)
    return exchanges


def chat_segments(example: ChatExample) -> list[Segment]:
    """Segments of the chat template with their roles (see module docstring)."""
    segments: list[Segment] = []
    for index, (user_text, assistant_text) in enumerate(chat_exchanges(example.turns)):
        # The <|user|> that opens a later exchange also closes the previous reply: it is predicted.
        segments.append(Segment(ROLE_CONTEXT if index == 0 else ROLE_RESPONSE, special=USER_TAG))
        segments.append(Segment(ROLE_CONTEXT, text=f"\n{user_text}\n"))
        segments.append(Segment(ROLE_CONTEXT, special=ASSISTANT_TAG))
        segments.append(Segment(ROLE_CONTEXT, text="\n"))
        segments.append(Segment(ROLE_RESPONSE, text=f"{assistant_text}\n"))
    segments.append(Segment(ROLE_RESPONSE, special=EOS))
    return segments


def cot_segments(example: CoTExample) -> list[Segment]:
    """Segments of the CoT template with their roles (see module docstring)."""
    prompt = _clean(example.prompt, "prompt")
    rationale = _clean(example.rationale, "rationale")
    answer = _clean(example.answer, "answer")
    return [
        Segment(ROLE_CONTEXT, special=USER_TAG),
        Segment(ROLE_CONTEXT, text=f"\n{prompt}\n"),
        Segment(ROLE_CONTEXT, special=RATIONALE_TAG),
        Segment(ROLE_CONTEXT, text="\n"),
        Segment(ROLE_RATIONALE, text=f"{rationale}\n"),
        Segment(ROLE_ANSWER, special=ANSWER_TAG),
        Segment(ROLE_ANSWER, text=f"\n{answer}"),
        Segment(ROLE_ANSWER, special=EOS),
    ]


def example_segments(example: Example) -> list[Segment]:
    """Segments of either template."""
    if isinstance(example, ChatExample):
        return chat_segments(example)
    if isinstance(example, CoTExample):
        return cot_segments(example)
    raise TypeError(f"not an example: {type(example).__name__}")


def render_text(segments: Sequence[Segment], eos_token: str) -> str:
    """The formatted string the segments stand for (what a person or ``decode`` would read)."""
    return "".join(eos_token if s.special == EOS else (s.special or s.text) for s in segments)


def format_chat_prompt(turns: Sequence[tuple[str, str]]) -> str:
    """A generation prompt for a chat whose last turn is the user's: ends with ``<|assistant|>\\n``."""
    if turns and turns[-1][0] == "assistant":
        raise FormatError("bad_turn_order", "a generation prompt ends with a user turn", len(turns) - 1)
    exchanges = chat_exchanges([*turns, ("assistant", "(to be generated)")])
    history = "".join(f"{USER_TAG}\n{user}\n{ASSISTANT_TAG}\n{reply}\n" for user, reply in exchanges[:-1])
    return f"{history}{USER_TAG}\n{exchanges[-1][0]}\n{ASSISTANT_TAG}\n"


def format_cot_prompt(prompt: str) -> str:
    """A generation prompt for CoT: ends with ``<|rationale|>\\n``, where the model starts reasoning."""
    return f"{USER_TAG}\n{_clean(prompt, 'prompt')}\n{RATIONALE_TAG}\n"


class RoleEncoder:
    """Tokenizes examples segment by segment with a fast tokenizer, in batches.

    Holds a private copy of the Rust tokenizer (no truncation, no padding, special tokens inside
    text split as plain text), so the caller's tokenizer is left untouched. Picklable cheaply
    (for worker processes) without importing transformers on the other side.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError("RoleEncoder needs a fast (Rust) tokenizer; load it with use_fast=True")
        vocab = tokenizer.get_vocab()
        missing = [tag for tag in STRUCTURAL_TAGS if tag not in vocab]
        if missing:
            raise ValueError(f"tokenizer lacks {missing}; call composer_remask.data.tokenizer."
                             "add_remask_tokens(tokenizer) first")
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has no EOS token; the formats end every example with EOS")
        special_ids = {tag: int(vocab[tag]) for tag in STRUCTURAL_TAGS}
        special_ids[EOS] = int(tokenizer.eos_token_id)
        self._setup(tokenizer.backend_tokenizer.to_str(), special_ids)
        self._warn_if_not_whole_string_equivalent()

    def _setup(self, backend_json: str, special_ids: dict[str, int]) -> None:
        from tokenizers import Tokenizer

        self._backend_json = backend_json
        self.special_ids = dict(special_ids)
        backend = Tokenizer.from_str(backend_json)
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = True
        self._backend = backend
        self._whole_string_backend = None
        self._cache: dict[str, list[int]] = {}
        self._cache["\n"] = self._encode_texts(["\n"])[0]

    @classmethod
    def _from_state(cls, backend_json: str, special_ids: dict[str, int]) -> RoleEncoder:
        encoder = cls.__new__(cls)
        encoder._setup(backend_json, special_ids)
        return encoder

    def __reduce__(self):
        return (RoleEncoder._from_state, (self._backend_json, self.special_ids))

    @property
    def eos_token_id(self) -> int:
        return self.special_ids[EOS]

    def _encode_texts(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self._backend.encode_batch_fast(texts, add_special_tokens=False)]

    def encode(self, example: Example) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids int32, token_roles int8)`` for one example."""
        return self.encode_batch([example])[0]

    def encode_batch(self, examples: Sequence[Example]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Like ``encode`` for many examples, with one batched call into the Rust tokenizer."""
        all_segments = [example_segments(example) for example in examples]
        pending = [s.text for segments in all_segments for s in segments
                   if s.special is None and s.text not in self._cache]
        encoded = iter(self._encode_texts(pending))
        results = []
        for segments in all_segments:
            ids: list[int] = []
            roles: list[int] = []
            for segment in segments:
                if segment.special is not None:
                    piece = [self.special_ids[segment.special]]
                else:
                    piece = self._cache.get(segment.text) or next(encoded)
                ids.extend(piece)
                roles.extend([segment.role] * len(piece))
            results.append((np.array(ids, dtype=np.int32), np.array(roles, dtype=np.int8)))
        return results

    def encode_whole_string(self, example: Example) -> list[int]:
        """Ids of the rendered string tokenized in one piece (tags recognized): for comparison."""
        if self._whole_string_backend is None:
            from tokenizers import Tokenizer

            self._whole_string_backend = Tokenizer.from_str(self._backend_json)
            self._whole_string_backend.no_truncation()
            self._whole_string_backend.no_padding()
        backend = self._whole_string_backend
        eos_token = backend.id_to_token(self.eos_token_id)
        return backend.encode(render_text(example_segments(example), eos_token), add_special_tokens=False).ids

    def _warn_if_not_whole_string_equivalent(self) -> None:
        probes = [
            ChatExample((("system", "Be brief."), ("user", "What is 12 times 7?"),
                         ("assistant", "12 * 7 = 84."), ("user", "Thanks!"), ("assistant", "You're welcome."))),
            CoTExample("Tom has 3 apples and buys 4 more. How many?", "3 + 4 = 7.", "7"),
        ]
        for probe in probes:
            if self.encode(probe)[0].tolist() != self.encode_whole_string(probe):
                warnings.warn("this tokenizer tokenizes text differently in pieces than in one string "
                              "(e.g. a SentencePiece prefix space); role boundaries stay exact but "
                              "training ids may differ slightly from a whole-string prompt", stacklevel=3)
                return


_encoders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def role_encoder(tokenizer: PreTrainedTokenizerBase) -> RoleEncoder:
    """The (cached) RoleEncoder of a tokenizer. Build a new one after adding tokens to it."""
    key = (len(tokenizer), tokenizer.eos_token_id)
    cached = _encoders.get(tokenizer)
    if cached is None or cached[0] != key:
        cached = (key, RoleEncoder(tokenizer))
        _encoders[tokenizer] = cached
    return cached[1]


def encode_example(tokenizer: PreTrainedTokenizerBase, example: Example) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids int32, token_roles int8)`` of one example in its template."""
    return role_encoder(tokenizer).encode(example)


def encode_examples(tokenizer: PreTrainedTokenizerBase,
                    examples: Sequence[Example]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Batched ``encode_example`` (one call into the fast tokenizer)."""
    return role_encoder(tokenizer).encode_batch(examples)


def fit_to_length(input_ids: np.ndarray, token_roles: np.ndarray,
                  max_seq_len: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Fit an encoded example into ``max_seq_len`` tokens; returns ``(ids, roles, outcome)``.

    Over-long examples lose tokens from the end, then any context left dangling at the end (it
    would carry no loss). An example is dropped (``ids``/``roles`` empty, outcome a ``DROP_*``
    reason) when it would lose any answer token (CoT answers are never cut) or keep no predicted
    token. Outcome ``FIT_KEPT`` or ``FIT_TRUNCATED`` otherwise.
    """
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
    if len(input_ids) <= max_seq_len:
        return input_ids, token_roles, FIT_KEPT
    empty_ids, empty_roles = input_ids[:0], token_roles[:0]
    if np.any(token_roles[max_seq_len:] == ROLE_ANSWER):
        return empty_ids, empty_roles, DROP_TOO_LONG_ANSWER
    kept_roles = token_roles[:max_seq_len]
    predicted = np.flatnonzero(np.isin(kept_roles, PREDICTED_ROLES))
    if predicted.size == 0:
        return empty_ids, empty_roles, DROP_TOO_LONG_NO_PREDICTED
    end = int(predicted[-1]) + 1
    return input_ids[:end], token_roles[:end], FIT_TRUNCATED
