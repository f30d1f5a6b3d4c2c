"""The method's options, checked once where they enter: ``ReMask(...)`` or ``remask_step_loss(...)``.

The defaults live here (``ReMask``'s signature reads them). Messages name the public argument
(``weight``, the card's name for the divergence weight), so a recipe error points at the YAML key
(``algorithms.remask.weight``).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from composer_remask.arguments import check_type
from composer_remask.batch import LAYOUT_FULL, LAYOUT_FULL_AND_MASKED, LAYOUT_MASKED_ONLY
from composer_remask.checks import finite_number
from composer_remask.remask.divergences import divergence_spec
from composer_remask.remask.masking import MaskVocabulary

__all__ = ["CARD_LABEL_RULE_PROB", "RemaskOptions", "at_least"]

# The card's ReMask-CoT label rules: rationale_label_drop_prob and answer_only_prob left as None mean this.
CARD_LABEL_RULE_PROB = 0.1

# The name a user writes for each option where it differs from the field's.
_PUBLIC_NAMES = {"divergence_weight": "weight"}


def at_least(name: str, value: int | None, low: int) -> int | None:
    """An optional whole-number argument of ``ReMask`` as an ``int`` (numpy's too), refused below ``low``."""
    if value is not None and value < low:
        raise ValueError(f"ReMask: {name} must be >= {low} (or None), got {value!r}")
    return None if value is None else int(value)


@dataclasses.dataclass(frozen=True)
class RemaskOptions:
    """What to mask and what to train on; see ``ReMask`` for each argument."""

    mask_prob: float = 0.4
    divergence_weight: float = 0.1
    divergence: str = "sym_kl"
    mask_strategy: str = "mask_token"
    mask_token_id: int | None = None
    # None: the card's CARD_LABEL_RULE_PROB where batches carry token roles, and no warning where they do
    # not (llm-foundry's own loaders); a value the user sets is kept, and warned about without roles.
    rationale_label_drop_prob: float | None = None
    answer_only_prob: float | None = None
    detach_full: bool = False
    masked_only: bool = False

    def __post_init__(self) -> None:
        # Types first, as the signature says (the recipes check the same hints): nothing is reinterpreted.
        hints = typing.get_type_hints(RemaskOptions)
        for field in dataclasses.fields(self):
            problem = check_type(getattr(self, field.name), hints[field.name])
            if problem:
                raise TypeError(f"ReMask: {_PUBLIC_NAMES.get(field.name, field.name)} {problem}")
        for name, high in (("mask_prob", 1.0), ("divergence_weight", None), ("rationale_label_drop_prob", 1.0),
                           ("answer_only_prob", 1.0)):
            if getattr(self, name) is None:
                continue
            what = f"ReMask: {_PUBLIC_NAMES.get(name, name)}"
            object.__setattr__(self, name, finite_number(getattr(self, name), what, low=0.0, high=high))
        divergence_spec(self.divergence)
        MaskVocabulary(self.mask_strategy)
        object.__setattr__(self, "mask_token_id", at_least("mask_token_id", self.mask_token_id, 0))
        if self.masked_only and self.divergence_weight > 0:
            raise ValueError(f"ReMask: masked_only=True trains one pass on the masked input, so there is no full pass "
                             f"for the divergence; set weight=0 (got weight={self.divergence_weight}).")

    @classmethod
    def from_arguments(cls, **arguments: Any) -> RemaskOptions:
        """The options from ``ReMask``'s argument names (``weight`` is the divergence weight)."""
        for field, public in _PUBLIC_NAMES.items():
            if field in arguments:
                raise TypeError(f"ReMask: unknown argument {field!r}; it is called {public!r}")
            if public in arguments:
                arguments[field] = arguments.pop(public)
        return cls(**arguments)

    @property
    def label_rule_probs(self) -> tuple[float, float]:
        """``(rationale_label_drop_prob, answer_only_prob)`` as applied: ``None`` is the card's value."""
        drop, answer_only = self.rationale_label_drop_prob, self.answer_only_prob
        return (CARD_LABEL_RULE_PROB if drop is None else drop,
                CARD_LABEL_RULE_PROB if answer_only is None else answer_only)

    @property
    def explicit_label_rules(self) -> bool:
        """Whether the user set a label rule above 0 (then batches without token roles are warned about)."""
        return any(value is not None and value > 0 for value in (self.rationale_label_drop_prob, self.answer_only_prob))

    @property
    def layout(self) -> str:
        """Which passes run (``composer_remask.batch.LAYOUTS``): ``mask_prob == 0`` is one full pass."""
        if self.mask_prob <= 0:
            return LAYOUT_FULL
        return LAYOUT_MASKED_ONLY if self.masked_only else LAYOUT_FULL_AND_MASKED
