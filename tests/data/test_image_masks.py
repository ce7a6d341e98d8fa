"""Masks with alpha: flat paint whose alpha marks the subject weighs by alpha, varying grey by
grey × alpha, opaque masks by grey; and the notes (coloured, alpha used) for the trainer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modules.data.images import (
    MaskNotes,
    load_mask,
    load_mask_with_notes,
    mask_image_to_tensor,
    mask_notes,
)
from modules.data.video import clip_info, load_clip_mask
from tests.data.video_files import write_frames

ALPHA_BANDS = np.repeat(np.array([0, 64, 128, 255], dtype=np.uint8), 2)  # (8,): 2 px per level
"""Alpha of the columns of the 8×8 test masks: the subject fades in from the left."""


def columns(values: np.ndarray) -> np.ndarray:
    """An 8×8 image whose every row is ``values`` ((8,) or (8, C))."""
    return np.broadcast_to(values, (8, *values.shape)).copy()


def row_weights(mask: torch.Tensor) -> list[float]:
    """The weights of the middle row of a (1, 8, 8) mask."""
    assert mask.shape == (1, 8, 8)
    return mask[0, 4].tolist()


def save(path: Path, pixels: np.ndarray, mode: str, **options) -> Path:
    Image.fromarray(pixels, mode).save(path, **options)
    return path


def test_white_rgba_mask_weighs_by_its_alpha(tmp_path: Path) -> None:
    rgba = np.zeros((8, 4), dtype=np.uint8)
    rgba[:, :3] = 255
    rgba[:, 3] = ALPHA_BANDS
    path = save(tmp_path / "a-masklabel.png", columns(rgba), "RGBA")

    mask, notes = load_mask_with_notes(path, (8, 8), 8)

    assert row_weights(mask) == pytest.approx((ALPHA_BANDS / 255).tolist(), abs=1e-6)
    assert notes == MaskNotes(coloured=False, alpha_used=True)


def test_black_la_mask_weighs_by_its_alpha(tmp_path: Path) -> None:
    la = np.stack([np.zeros(8, dtype=np.uint8), ALPHA_BANDS], axis=1)  # (8, 2): black, alpha
    path = save(tmp_path / "a-masklabel.png", columns(la), "LA")

    mask = load_mask(path, (8, 8), 8)

    assert row_weights(mask) == pytest.approx((ALPHA_BANDS / 255).tolist(), abs=1e-6)


def test_varying_grey_with_partial_alpha_weighs_grey_times_alpha(tmp_path: Path) -> None:
    grey = np.array([255, 255, 128, 128, 255, 255, 64, 64], dtype=np.uint8)
    la = np.stack([grey, ALPHA_BANDS], axis=1)  # (8, 2)
    path = save(tmp_path / "a-masklabel.png", columns(la), "LA")

    mask, notes = load_mask_with_notes(path, (8, 8), 8)

    expected = (grey / 255 * ALPHA_BANDS / 255).tolist()
    assert row_weights(mask) == pytest.approx(expected, abs=1e-6)
    assert notes.alpha_used


def test_opaque_rgba_mask_weighs_by_its_grey(tmp_path: Path) -> None:
    grey = np.array([0, 0, 80, 80, 128, 128, 255, 255], dtype=np.uint8)
    rgba = np.stack([grey, grey, grey, np.full(8, 255, dtype=np.uint8)], axis=1)  # (8, 4)
    path = save(tmp_path / "a-masklabel.png", columns(rgba), "RGBA")

    mask, notes = load_mask_with_notes(path, (8, 8), 8)

    assert row_weights(mask) == pytest.approx((grey / 255).tolist(), abs=1e-6)
    assert notes == MaskNotes(coloured=False, alpha_used=False)


def test_opaque_flat_white_rgba_mask_is_all_ones(tmp_path: Path) -> None:
    path = tmp_path / "a-masklabel.png"
    Image.new("RGBA", (8, 8), (255, 255, 255, 255)).save(path)

    torch.testing.assert_close(load_mask(path, (8, 8), 4), torch.ones(1, 4, 4))


def test_palette_mask_with_per_entry_alpha_weighs_by_alpha(tmp_path: Path) -> None:
    # Four white palette entries whose tRNS alpha values are the bands' levels.
    indices = columns(np.repeat(np.arange(4, dtype=np.uint8), 2))
    image = Image.fromarray(indices, "P")
    image.putpalette([255, 255, 255] * 4)
    path = tmp_path / "a-masklabel.png"
    image.save(path, transparency=bytes([0, 64, 128, 255]))
    assert Image.open(path).mode == "P"

    mask, notes = load_mask_with_notes(path, (8, 8), 8)

    assert row_weights(mask) == pytest.approx((ALPHA_BANDS / 255).tolist(), abs=1e-6)
    assert notes.alpha_used


def test_palette_mask_with_a_transparent_entry_makes_it_background(tmp_path: Path) -> None:
    # Entry 0 (grey 128) transparent, entry 1 white: the colours vary, so grey × alpha.
    indices = columns(np.array([0, 0, 0, 0, 1, 1, 1, 1], dtype=np.uint8))
    image = Image.fromarray(indices, "P")
    image.putpalette([128, 128, 128, 255, 255, 255])
    path = tmp_path / "a-masklabel.png"
    image.save(path, transparency=0)

    mask = load_mask(path, (8, 8), 8)

    assert row_weights(mask) == pytest.approx([0.0] * 4 + [1.0] * 4, abs=1e-6)


def test_palette_mask_without_transparency_weighs_by_luminance(tmp_path: Path) -> None:
    indices = columns(np.array([0, 0, 0, 0, 1, 1, 1, 1], dtype=np.uint8))
    image = Image.fromarray(indices, "P")
    image.putpalette([128, 128, 128, 255, 255, 255])

    assert row_weights(mask_image_to_tensor(image, 8)) == pytest.approx(
        [128 / 255] * 4 + [1.0] * 4, abs=1e-6
    )
    assert mask_notes(image) == MaskNotes(coloured=False, alpha_used=False)


def test_grey_mask_with_a_transparent_value_makes_it_background(tmp_path: Path) -> None:
    grey = np.array([200, 200, 200, 200, 7, 7, 128, 128], dtype=np.uint8)
    path = save(tmp_path / "a-masklabel.png", columns(grey), "L", transparency=7)

    mask, notes = load_mask_with_notes(path, (8, 8), 8)

    assert row_weights(mask) == pytest.approx([200 / 255] * 4 + [0.0] * 2 + [128 / 255] * 2)
    assert notes.alpha_used


def test_red_green_mask_is_coloured(tmp_path: Path) -> None:
    colours = np.array([[255, 0, 0]] * 4 + [[0, 255, 0]] * 4, dtype=np.uint8)  # (8, 3)
    path = save(tmp_path / "a-masklabel.png", columns(colours), "RGB")

    mask, notes = load_mask_with_notes(path, (8, 8), 8)

    assert notes == MaskNotes(coloured=True, alpha_used=False)
    # Still weighed by luminance (ITU-R 601: 0.299 R + 0.587 G + 0.114 B).
    assert row_weights(mask) == pytest.approx([76 / 255] * 4 + [150 / 255] * 4, abs=1e-6)


def test_grey_mask_with_jpeg_like_noise_is_not_coloured() -> None:
    rng = np.random.default_rng(0)
    grey = rng.integers(3, 253, (8, 8, 1))
    noisy = (grey + rng.integers(-3, 4, (8, 8, 3))).astype(np.uint8)  # channels differ by ≤ 6
    assert np.ptp(noisy, axis=2).max() > 0

    assert mask_notes(Image.fromarray(noisy, "RGB")) == MaskNotes(coloured=False, alpha_used=False)


def test_colours_under_full_transparency_do_not_count_as_coloured() -> None:
    rgba = np.zeros((8, 4), dtype=np.uint8)
    rgba[:4] = [255, 0, 0, 0]  # red, but invisible
    rgba[4:] = [255, 255, 255, 255]

    assert mask_notes(Image.fromarray(columns(rgba), "RGBA")) == MaskNotes(
        coloured=False, alpha_used=True
    )


def test_grey_masks_are_never_coloured_and_have_no_alpha() -> None:
    for image in (
        Image.new("L", (4, 4), 100),
        Image.new("1", (4, 4), 1),
        Image.fromarray(np.full((4, 4), 30000, dtype=np.uint16)),
    ):
        assert mask_notes(image) == MaskNotes(coloured=False, alpha_used=False)


@pytest.mark.parametrize(
    ("mode", "stored", "weight"),
    [("I", 49152, 49152 / 65535), ("F", 0.25, 0.25), ("1", True, 1.0)],
)
def test_deep_and_one_bit_masks_use_their_scale(mode: str, stored, weight: float) -> None:
    dtype = {"I": np.int32, "F": np.float32, "1": bool}[mode]
    image = Image.fromarray(np.full((8, 8), stored, dtype=dtype))
    assert image.mode == mode

    torch.testing.assert_close(mask_image_to_tensor(image, 4), torch.full((1, 4, 4), weight))


def test_still_rgba_mask_of_a_clip_weighs_by_its_alpha(tmp_path: Path) -> None:
    clip = write_frames(tmp_path / "clip", np.zeros((2, 8, 8, 3), dtype=np.uint8))
    rgba = np.zeros((8, 4), dtype=np.uint8)
    rgba[:, :3] = 255
    rgba[:, 3] = ALPHA_BANDS
    mask = save(tmp_path / "clip-masklabel.png", columns(rgba), "RGBA")

    weights = load_clip_mask(mask, clip, clip_info(clip), [0, 1], 8)  # (1, F, R, R)

    assert weights.shape == (1, 2, 8, 8)
    for frame in range(2):
        assert weights[0, frame, 4].tolist() == pytest.approx((ALPHA_BANDS / 255).tolist())
