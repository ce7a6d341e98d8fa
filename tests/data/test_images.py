from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modules.data.concept import DataError
from modules.data.images import image_size, load_image, load_mask, mask_to_latent


def test_load_image_is_float32_in_minus_one_to_one(tmp_path: Path, write_image) -> None:
    path = write_image(tmp_path / "a.png", size=(48, 32), colour=(255, 0, 127))

    image = load_image(path, 16)

    assert image.shape == (3, 16, 16)
    assert image.dtype == torch.float32
    torch.testing.assert_close(image[:, 8, 8], torch.tensor([1.0, -1.0, 127 / 127.5 - 1]))


def test_load_image_crops_the_centre_of_the_long_side(tmp_path: Path, write_image) -> None:
    # 30×10: red | green | blue thirds; the centred 10×10 square is the green third.
    pixels = np.zeros((10, 30, 3), dtype=np.uint8)
    pixels[:, :10, 0] = pixels[:, 10:20, 1] = pixels[:, 20:, 2] = 255
    path = write_image(tmp_path / "wide.png", pixels=pixels)

    image = load_image(path, 10)

    green = torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 10, 10)
    torch.testing.assert_close(image, green, atol=1e-6, rtol=0)


def test_rgba_image_is_composited_over_white(tmp_path: Path) -> None:
    path = tmp_path / "clear.png"
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(path)

    torch.testing.assert_close(load_image(path, 8), torch.ones(3, 8, 8))


@pytest.mark.parametrize("resolution", [32, 16])
def test_mask_grey_levels_are_weights(tmp_path: Path, write_mask, resolution: int) -> None:
    # Four vertical bands 8 px wide: shrinking by 2 averages within a band, so levels survive.
    values = np.repeat(np.array([255, 128, 80, 0], dtype=np.uint8), 8)[None, :].repeat(32, 0)
    path = write_mask(tmp_path / "a-masklabel.png", values)

    mask = load_mask(path, (32, 32), resolution)

    assert mask.shape == (1, resolution, resolution)
    assert mask.dtype == torch.float32
    band = resolution // 4
    expected = torch.tensor([1.0, 0.50196, 0.31373, 0.0]).repeat_interleave(band)
    torch.testing.assert_close(mask[0], expected.expand(resolution, -1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_colour_mask_uses_luminance(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "a-masklabel.png"
    colour = (128, 128, 128) if mode == "RGB" else (128, 128, 128, 255)
    Image.new(mode, (8, 8), colour).save(path)

    mask = load_mask(path, (8, 8), 8)

    torch.testing.assert_close(mask, torch.full((1, 8, 8), 128 / 255))


def test_sixteen_bit_mask_uses_its_full_scale(tmp_path: Path) -> None:
    path = tmp_path / "a-masklabel.png"
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(path)

    torch.testing.assert_close(load_mask(path, (8, 8), 4), torch.full((1, 4, 4), 32768 / 65535))


def test_mask_and_image_share_the_crop_geometry(tmp_path: Path, write_image, write_mask) -> None:
    # 48×32 image with a red 8×8 square right of centre; the mask marks the same square.
    pixels = np.zeros((32, 48, 3), dtype=np.uint8)
    pixels[12:20, 28:36, 0] = 255
    image_path = write_image(tmp_path / "a.png", pixels=pixels)
    values = np.zeros((32, 48), dtype=np.uint8)
    values[12:20, 28:36] = 255
    mask_path = write_mask(tmp_path / "a-masklabel.png", values)

    image = load_image(image_path, 16)
    mask = load_mask(mask_path, (48, 32), 16)

    red = image[0] > 0.0
    assert red.any()
    assert torch.equal(red, mask[0] > 0.5)


def test_mask_of_another_size_names_the_file_both_sizes_and_the_fix(
    tmp_path: Path, write_mask
) -> None:
    path = write_mask(tmp_path / "a-masklabel.png", size=(40, 30))

    with pytest.raises(DataError) as error:
        load_mask(path, (64, 48), 16)

    message = str(error.value)
    assert "a-masklabel.png" in message
    assert "40×30" in message
    assert "64×48" in message
    assert "re-export the mask at 64×48" in message


def test_corrupt_image_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(b"this is not a PNG")

    with pytest.raises(DataError, match=r"cannot read image '.*broken\.png'.*replace the file"):
        load_image(path, 16)


def test_truncated_image_names_the_file(tmp_path: Path, write_image) -> None:
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    path = write_image(tmp_path / "cut.png", pixels=noise)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    with pytest.raises(DataError, match=r"cut\.png"):
        load_image(path, 16)


def test_corrupt_mask_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "a-masklabel.png"
    path.write_bytes(b"\x89PNG garbage")

    with pytest.raises(DataError, match=r"cannot read mask '.*a-masklabel\.png'"):
        load_mask(path, (32, 32), 16)


def test_image_size_follows_exif_orientation(tmp_path: Path) -> None:
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated by 90°
    Image.new("RGB", (40, 20)).save(path, exif=exif)

    assert image_size(path) == (20, 40)


def test_mask_to_latent_averages_areas() -> None:
    mask = torch.tensor(
        [
            [1.0, 1.0, 0.0, 0.0],
            [1.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.5, 0.5],
            [0.0, 1.0, 0.5, 0.5],
        ]
    ).unsqueeze(0)

    latent = mask_to_latent(mask, (2, 2))

    # Each cell is the mean of its 2×2 block; the hard 1/0 edge becomes soft (0.75, 0.25).
    torch.testing.assert_close(latent, torch.tensor([[[0.75, 0.0], [0.25, 0.5]]]))


def test_mask_to_latent_rejects_other_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(1, H, W\)"):
        mask_to_latent(torch.ones(2, 4, 4), (2, 2))
