"""ReMask / ReMask-CoT in Composer's algorithm shape: the event adapter and the parts it runs.

See ``README.md`` next to this file (the method card). ``ReMask`` is the Composer algorithm; the
functions below are the same method without a Trainer.
"""

from composer_remask.remask.algorithm import ReMask
from composer_remask.remask.divergences import DIVERGENCES, token_divergence
from composer_remask.remask.functional import remask_step_loss
from composer_remask.remask.loss import LossSums, remask_loss, remask_loss_from_rows
from composer_remask.remask.masking import MaskVocabulary, remask_batch

__all__ = ["DIVERGENCES", "LossSums", "MaskVocabulary", "ReMask", "remask_batch", "remask_loss",
           "remask_loss_from_rows", "remask_step_loss", "token_divergence"]
