"""Loss functions: pure tensor maths, no config objects."""

from modules.loss.masked_loss import LossBreakdown, MaskWeights, masked_prior_loss, process_masks

__all__ = ["LossBreakdown", "MaskWeights", "masked_prior_loss", "process_masks"]
