"""The mask being edited: its grey levels, painting, fill, undo and redo, loading and saving.

No Tk, no torch (tested without a display). The mask is ``(H, W)`` uint8 at the image's own
size, grey level / 255 = loss weight, saved as an 8-bit grey PNG ``NAME-masklabel.png`` next to
the image, atomically (a failed save keeps the file as it was).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

from modules.atomic import write_bytes_atomic

HISTORY = 50
"""Edits kept for undo."""


class MaskLayer:
    def __init__(self, levels: np.ndarray, path: Path) -> None:
        self.levels = np.array(levels, dtype=np.uint8, order="C")  # a writable copy
        self.path = path
        """Where Save writes."""
        self._undo: list[np.ndarray] = []
        self._redo: list[np.ndarray] = []
        self._saved = self.levels.copy()

    @classmethod
    def open(cls, image: Path, mask: Path | None) -> MaskLayer:
        """The image's mask (``mask``, or all 0 when it has none) at the image's upright size;
        Save writes ``NAME-masklabel.png`` (or the PNG mask it was loaded from)."""
        with Image.open(image) as picture:
            width, height = ImageOps.exif_transpose(picture).size
        target = image.with_name(f"{image.stem}-masklabel.png")
        if mask is None:
            return cls(np.zeros((height, width), np.uint8), target)
        with Image.open(mask) as painted:
            levels = np.asarray(ImageOps.exif_transpose(painted).convert("L"))
        if levels.shape != (height, width):
            raise ValueError(
                f"{mask}: the mask is {levels.shape[1]}x{levels.shape[0]} and its image "
                f"{width}x{height}; fix or delete it"
            )
        return cls(levels, mask if mask.suffix.lower() == ".png" else target)

    @property
    def dirty(self) -> bool:
        return not np.array_equal(self.levels, self._saved)

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    def begin(self) -> None:
        """Start one edit (a stroke, a fill): undo goes back to here."""
        self._undo.append(self.levels.copy())
        del self._undo[:-HISTORY]
        self._redo.clear()

    def paint(self, points: Sequence[tuple[float, float]], radius: int, value: int) -> None:
        """A round brush of ``radius`` pixels along ``points`` (image pixels), at ``value``;
        part of the edit :meth:`begin` started."""
        value = int(np.clip(value, 0, 255))
        spots = [(round(x), round(y)) for x, y in points]
        for a, b in zip(spots, spots[1:] or spots, strict=False):
            cv2.line(self.levels, a, b, value, thickness=max(1, 2 * radius + 1))
        for spot in spots:
            cv2.circle(self.levels, spot, radius, value, thickness=-1)

    def fill(self, point: tuple[float, float] | None, value: int) -> None:
        """One edit: the connected region of equal level around ``point`` takes ``value``;
        None: the whole mask."""
        self.begin()
        if point is None:
            self.levels[:] = value
            return
        x, y = round(point[0]), round(point[1])
        height, width = self.levels.shape
        if not (0 <= x < width and 0 <= y < height):
            return
        region = np.zeros((height + 2, width + 2), np.uint8)
        flags = 4 | cv2.FLOODFILL_FIXED_RANGE | (255 << 8)
        cv2.floodFill(self.levels, region, (x, y), int(value), 0, 0, flags)

    def replace(self, levels: np.ndarray) -> None:
        """One edit: the whole mask becomes ``levels`` (a generated mask)."""
        if levels.shape != self.levels.shape:
            raise ValueError(f"a mask of {levels.shape} for an image of {self.levels.shape}")
        self.begin()
        self.levels[:] = levels

    def undo(self) -> None:
        if self._undo:
            self._redo.append(self.levels.copy())
            self.levels = self._undo.pop()

    def redo(self) -> None:
        if self._redo:
            self._undo.append(self.levels.copy())
            self.levels = self._redo.pop()

    def save(self) -> Path:
        buffer = io.BytesIO()
        Image.fromarray(self.levels, "L").save(buffer, format="PNG")
        write_bytes_atomic(self.path, buffer.getvalue())
        self._saved = self.levels.copy()
        return self.path
