"""Masks from an edit pair: where the target differs from its reference.

An edit LoRA should learn what the edit changes and, everywhere else, do what the base edit
model does with the same reference. The mask of a pair says which is which, at the
``mask.tiers`` levels the tiered masks use:

- "changed" (the face level, learnt fully): pixels whose colour differs from the reference's
  by more than ``threshold`` grey levels (the largest of the three channels' differences), after
  both are smoothed a little so that noise, JPEG blocks and resampling do not count; specks
  smaller than about 1 % of the short side are dropped and small holes filled;
- "near" (the body level, learnt in part): a band ``near`` (a fraction of the short side) wide
  around the changed region, where the edit blends into what it kept;
- "unchanged" (0, background): the rest, held to the base model by the prior.

The reference is aligned to the target by resizing it to the target's size (as a pipeline
resizes its references): a reference of another aspect ratio is stretched, which
:func:`aspect_note` names.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from modules.config.schema import MaskTiersConfig
from modules.masks.generated import GeneratedMask

THRESHOLD = 24
"""Grey levels (0-255, the largest channel difference) above which a pixel has changed:
above JPEG and resampling noise (a few levels), below any edit one would see."""
NEAR = 0.04
"""Width of the "near" band around the changed region, as a fraction of the short side."""
ASPECT_TOLERANCE = 0.02
"""Aspect ratios closer than this (relative) count as the same."""


def generate_difference(
    target: np.ndarray,
    reference: np.ndarray,
    tiers: MaskTiersConfig | None = None,
    *,
    threshold: float = THRESHOLD,
    near: float = NEAR,
) -> GeneratedMask:
    """The mask of where ``target`` (H, W, 3) uint8 differs from ``reference`` (any size,
    resized to the target's), at ``tiers``' levels: changed at ``face``, the band around it at
    ``body``, the rest 0. ``found`` is False (mask None) when nothing changed."""
    tiers = tiers or MaskTiersConfig()
    height, width = target.shape[:2]
    side = min(height, width)
    aligned = align(reference, (width, height))
    sigma = max(side / 256, 0.6)  # ~1 px at 256, 4 px at 1024: noise out, edges kept
    smooth_target = cv2.GaussianBlur(target.astype(np.float32), (0, 0), sigma)
    smooth_reference = cv2.GaussianBlur(aligned.astype(np.float32), (0, 0), sigma)
    difference = np.abs(smooth_target - smooth_reference).max(axis=2)  # (H, W)
    changed = (difference > threshold).astype(np.uint8)
    speck = _disk(max(side // 100, 1))
    changed = cv2.morphologyEx(changed, cv2.MORPH_OPEN, speck)  # drop specks
    changed = cv2.morphologyEx(changed, cv2.MORPH_CLOSE, speck)  # fill pinholes
    if not changed.any():
        return GeneratedMask(mask=None, found=False, note="the target equals its reference")
    band = cv2.dilate(changed, _disk(max(round(side * near), 1)))
    mask = np.zeros((height, width), np.uint8)
    mask[band > 0] = tiers.body
    mask[changed > 0] = tiers.face
    return GeneratedMask(mask=mask, found=True)


def align(reference: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``reference`` (H, W, 3) resized to ``size`` (width, height): area averaging to shrink,
    bilinear to grow."""
    width, height = size
    if reference.shape[:2] == (height, width):
        return reference
    shrinking = reference.shape[0] * reference.shape[1] > width * height
    method = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(reference, (width, height), interpolation=method)


def aspect_note(
    target: Path, target_size: tuple[int, int], reference: Path, size: tuple[int, int]
) -> str | None:
    """Why a pair's difference mask may mark more than the edit: a reference of another aspect
    ratio, stretched to the target's size; None when the ratios agree. Sizes (width, height)."""
    ratio, own = target_size[0] / target_size[1], size[0] / size[1]
    if abs(own / ratio - 1) <= ASPECT_TOLERANCE:
        return None
    return (
        f"reference '{reference}' is {size[0]}x{size[1]} and its target '{target.name}' "
        f"{target_size[0]}x{target_size[1]}: it was stretched to the target's shape, so its "
        "difference mask may mark more than the edit; crop the reference to the target's "
        "aspect ratio and run again, or check the mask in the mask editor"
    )


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
