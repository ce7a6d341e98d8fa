"""Shared fixtures of the data tests: counting stand-in encoders and small image writers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.data.stand_ins import StandInEncoders


@pytest.fixture
def encoders() -> StandInEncoders:
    return StandInEncoders()


@pytest.fixture
def write_image() -> Callable[..., Path]:
    """Write an RGB PNG/JPEG of ``size`` (width, height) filled with ``colour`` or ``pixels``."""

    def write(
        path: Path,
        size: tuple[int, int] = (32, 32),
        colour: tuple[int, int, int] = (200, 30, 30),
        pixels: np.ndarray | None = None,
    ) -> Path:
        image = Image.fromarray(pixels) if pixels is not None else Image.new("RGB", size, colour)
        image.save(path)
        return path

    return write


@pytest.fixture
def write_mask() -> Callable[..., Path]:
    """Write a greyscale PNG mask from a (height, width) uint8 array or a fill value."""

    def write(path: Path, values: np.ndarray | int = 255, size: tuple[int, int] = (32, 32)) -> Path:
        if isinstance(values, int):
            values = np.full((size[1], size[0]), values, dtype=np.uint8)
        Image.fromarray(values.astype(np.uint8), "L").save(path)
        return path

    return write
