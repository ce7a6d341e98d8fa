"""What a generator returns for one image."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GeneratedMask:
    mask: np.ndarray | None
    """uint8 (H, W) grey levels (value / 255 = loss weight); None when nothing was found."""
    found: bool
    """Whether the generator found what it looks for (a person, a subject)."""
    note: str = ""
    """Why nothing was found (``"no person found"``), or ``""`` when fine."""
