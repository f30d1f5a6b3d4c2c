"""The recipe's optimizer (Lilith) and learning-rate schedule (One Cycle cosine)."""

from composer_remask.optim.lilith import Lilith
from composer_remask.optim.schedule import OneCycleCosineScheduler

__all__ = ["Lilith", "OneCycleCosineScheduler"]
