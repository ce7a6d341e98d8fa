"""Loss functions: pure tensor maths, no config objects (a :class:`Weighting` is built from
the config once, by its caller)."""

from modules.loss.masked_loss import (
    LossBreakdown,
    MaskWeights,
    Weighting,
    masked_prior_loss,
    prediction_loss,
    process_masks,
)

__all__ = [
    "LossBreakdown",
    "MaskWeights",
    "Weighting",
    "masked_prior_loss",
    "prediction_loss",
    "process_masks",
]
