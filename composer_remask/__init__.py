"""ReMask and ReMask-CoT (regularized masking) for fine-tuning causal LMs with MosaicML Composer."""

from composer_remask.algorithm import ReMask
from composer_remask.divergence import remask_loss, token_divergence
from composer_remask.masking import remask_batch

__all__ = ["ReMask", "remask_loss", "remask_batch", "token_divergence"]
__version__ = "0.1.0"
