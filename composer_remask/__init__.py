"""ReMask and ReMask-CoT (regularized masking) for fine-tuning causal LMs with MosaicML Composer.

The public names are imported lazily, so tools that only need the data pipeline
(``remask-data``) do not pay for importing Composer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "ReMask": "composer_remask.algorithm",
    "remask_loss": "composer_remask.loss",
    "token_divergence": "composer_remask.loss",
    "remask_loss_from_rows": "composer_remask.loss",
    "LossSums": "composer_remask.loss",
    "DIVERGENCES": "composer_remask.loss",
    "remask_batch": "composer_remask.masking",
}
__all__ = ["ReMask", "remask_loss", "remask_loss_from_rows", "LossSums", "DIVERGENCES", "token_divergence",
           "remask_batch"]

if TYPE_CHECKING:
    from composer_remask.algorithm import ReMask
    from composer_remask.loss import (
        DIVERGENCES,
        LossSums,
        remask_loss,
        remask_loss_from_rows,
        token_divergence,
    )
    from composer_remask.masking import remask_batch


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'composer_remask' has no attribute {name!r}")
