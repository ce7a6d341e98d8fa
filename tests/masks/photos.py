"""Real photographs (scikit-image ships them) and the model files, for the mask tests."""

from __future__ import annotations

import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


@cache
def _models_ready() -> str:
    """ "" when the person models are present (fetched now if need be), else why not."""
    from modules.masks.model_files import missing_models

    if not missing_models():
        return ""
    fetched = subprocess.run(
        [sys.executable, "scripts/fetch_mask_models.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if fetched.returncode == 0 and not missing_models():
        return ""
    return (
        "mask models absent and not fetchable (run bash scripts/setup.sh with internet access): "
        + fetched.stderr.strip()[-300:]
    )


def require_models() -> None:
    """Skip the test, saying why, when the models are absent and cannot be fetched."""
    reason = _models_ready()
    if reason:
        pytest.skip(reason)


def photo(name: str) -> np.ndarray:
    """A scikit-image photograph as (H, W, 3) uint8 RGB (``astronaut``, ``coffee``, ...)."""
    import skimage.data

    pixels = getattr(skimage.data, name)()
    if pixels.ndim == 2:
        pixels = np.stack([pixels] * 3, axis=-1)
    return np.ascontiguousarray(pixels[..., :3].astype(np.uint8))
