"""Mask generation: tiered person masks (face, body, hair) and subject masks, on the CPU.

Nothing here imports torch or Tk, so the UI can call it from a background thread without
loading the training stack. See "Making masks" in the README.
"""

from modules.masks.batch import MaskSummary, masks_for_concept
from modules.masks.generated import GeneratedMask
from modules.masks.model_files import MaskModelsMissing
from modules.masks.person import generate_tiers
from modules.masks.subject import generate_subject

__all__ = [
    "GeneratedMask",
    "MaskModelsMissing",
    "MaskSummary",
    "generate_subject",
    "generate_tiers",
    "masks_for_concept",
]
