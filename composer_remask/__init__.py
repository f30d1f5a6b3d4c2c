"""ReMask and ReMask-CoT (regularized masking) for fine-tuning causal LMs with MosaicML Composer.

The public names are imported lazily, so tools that only need the data pipeline
(``remask-data``) do not pay for importing Composer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["DIVERGENCES", "LossSums", "ReMask", "remask_batch", "remask_loss", "remask_loss_from_rows",
           "remask_step_loss", "token_divergence"]
# Every public name lives in the method's package, composer_remask.remask.
_EXPORTS = dict.fromkeys(__all__, "composer_remask.remask")

if TYPE_CHECKING:
    from composer_remask.remask import (
        DIVERGENCES,
        LossSums,
        ReMask,
        remask_batch,
        remask_loss,
        remask_loss_from_rows,
        remask_step_loss,
        token_divergence,
    )


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'composer_remask' has no attribute {name!r}")
