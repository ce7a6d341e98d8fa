"""Huge images: a JPEG above Pillow's pixel limit decodes at a reduced scale, anything else above
it is a DataError naming the file and the fix; every unreadable file is a DataError; and
``image_size`` reads only the header."""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, JpegImagePlugin

from modules.data.concept import DataError
from modules.data.images import image_size, load_image, load_mask, open_image

ORIENTATION = 0x0112


def rotated_exif() -> Image.Exif:
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # stored landscape, shown turned by 90° clockwise
    return exif


@pytest.fixture
def small_limit(monkeypatch: pytest.MonkeyPatch) -> int:
    """Pillow's pixel limit lowered to 64×64, so that small files count as huge."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64)
    return 64 * 64


@pytest.fixture
def drafts(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The sizes JPEGs were decoded at through ``draft()``."""
    sizes: list[tuple[int, int]] = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = draft(self, mode, size)
        sizes.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    return sizes


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any decoding of pixels fails the test."""

    def load(self):
        raise AssertionError("the pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


@pytest.fixture(scope="module")
def huge_jpeg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 12000×16000 grey JPEG: 192 M pixels, over twice Pillow's default limit (2 × 89 M),
    where Image.open raises DecompressionBombError. Flat grey is 2 MB on disk, 0.6 s to write."""
    path = tmp_path_factory.mktemp("huge") / "huge.jpg"
    Image.new("L", (12000, 16000), 90).save(path, quality=90)
    return path


# ------------------------------------------------------------------------------ huge JPEGs


def test_a_jpeg_over_twice_the_default_limit_loads_at_the_training_size(
    huge_jpeg: Path, drafts: list[tuple[int, int]]
) -> None:
    limit = Image.MAX_IMAGE_PIXELS

    image = load_image(huge_jpeg, 64)

    assert image.shape == (3, 64, 64)
    torch.testing.assert_close(image, torch.full((3, 64, 64), 90 / 127.5 - 1), atol=2e-2, rtol=0)
    assert drafts == [(1500, 2000)]  # 1/8: the smallest scale keeping both sides ≥ 64
    assert limit == Image.MAX_IMAGE_PIXELS  # the process-wide limit is left alone


def test_image_size_of_a_huge_jpeg_reads_the_header(huge_jpeg: Path, no_decoding: None) -> None:
    assert image_size(huge_jpeg) == (12000, 16000)


def test_a_jpeg_over_the_limit_decodes_at_a_reduced_scale_in_colour(
    tmp_path: Path, small_limit: int, drafts: list[tuple[int, int]]
) -> None:
    path = tmp_path / "big.jpg"
    Image.new("RGB", (400, 300), (200, 40, 90)).save(path, quality=95)

    image = load_image(path, 32)

    assert drafts == [(50, 38)]  # 400×300 / 8, rounded up
    expected = torch.tensor([200, 40, 90]) / 127.5 - 1
    torch.testing.assert_close(image[:, 16, 16], expected, atol=3 / 127.5, rtol=0)


def test_a_drafted_jpeg_keeps_its_exif_orientation(tmp_path: Path, small_limit: int) -> None:
    # Stored 400×300: red left half, blue right half. Shown turned clockwise: red on top.
    pixels = np.zeros((300, 400, 3), dtype=np.uint8)
    pixels[:, :200, 0] = 255
    pixels[:, 200:, 2] = 255
    path = tmp_path / "phone.jpg"
    Image.fromarray(pixels).save(path, exif=rotated_exif(), quality=95)

    image = load_image(path, 32)

    assert image_size(path) == (300, 400)
    assert image[:, 4, 16].tolist() == pytest.approx([1.0, -1.0, -1.0], abs=0.1)
    assert image[:, 28, 16].tolist() == pytest.approx([-1.0, -1.0, 1.0], abs=0.1)


def test_a_drafted_jpeg_mask_is_checked_at_its_header_size(
    tmp_path: Path, small_limit: int, drafts: list[tuple[int, int]]
) -> None:
    image = tmp_path / "big.jpg"
    Image.new("RGB", (400, 300), (10, 10, 10)).save(image)
    mask = tmp_path / "big-masklabel.jpg"
    Image.new("L", (400, 300), 255).save(mask, quality=95)
    other = tmp_path / "other-masklabel.jpg"
    Image.new("L", (400, 296), 255).save(other, quality=95)

    weights = load_mask(mask, image_size(image), 32)

    assert drafts == [(50, 38)]  # decoded at 1/8, compared at 400×300
    torch.testing.assert_close(weights, torch.ones(1, 32, 32), atol=2 / 255, rtol=0)
    with pytest.raises(DataError, match=r"is 400×296 but its image is 400×300"):
        load_mask(other, image_size(image), 32)


def test_a_jpeg_too_big_even_at_a_reduced_scale_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "vast.jpg"
    Image.new("RGB", (400, 300)).save(path)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1/8 still gives 50×38 = 1900 pixels
        with pytest.raises(DataError) as error:
            load_image(path, 32)

    message = str(error.value)
    assert "vast.jpg" in message
    assert "400×300 (120,000 pixels), still 50×38 decoded at a reduced scale" in message
    assert "1,000 pixels" in message
    assert "downscale it" in message


def test_open_image_refuses_a_jpeg_over_the_limit(tmp_path: Path, small_limit: int) -> None:
    # open_image decodes at full size: its callers compare the size with other files'.
    path = tmp_path / "frame.jpg"
    Image.new("RGB", (100, 100)).save(path)

    with pytest.raises(DataError, match=r"frame\.jpg' is 100×100 \(10,000 pixels\)"):
        open_image(path, "clip")


# ------------------------------------------------------------------------------ other formats


def test_a_png_over_twice_the_limit_names_the_file_its_pixels_and_the_fix(
    tmp_path: Path, small_limit: int
) -> None:
    path = tmp_path / "poster.png"
    Image.new("RGB", (100, 100)).save(path)  # 10,000 pixels > 2 × 4,096: Image.open raises

    with pytest.raises(DataError) as error:
        load_image(path, 16)

    message = str(error.value)
    assert "image '" in message and "poster.png" in message
    assert "10,000 pixels" in message
    assert "limit of 4,096 pixels" in message
    assert "downscale it below the limit" in message
    assert isinstance(error.value.__cause__, Image.DecompressionBombError)


@pytest.mark.parametrize("warning", ["ignore", "error"])
def test_a_png_over_the_limit_is_refused_whatever_the_warning_filter(
    tmp_path: Path, small_limit: int, warning: str
) -> None:
    path = tmp_path / "poster.png"
    Image.new("L", (80, 80)).save(path)  # 6,400 pixels: over the limit, under twice it

    with warnings.catch_warnings():
        warnings.simplefilter(warning, Image.DecompressionBombWarning)
        with pytest.raises(DataError, match=r"poster\.png' is 6,400 pixels|80×80 \(6,400"):
            load_image(path, 16)


def test_a_mask_over_the_limit_asks_for_it_and_its_image_downscaled(
    tmp_path: Path, small_limit: int
) -> None:
    path = tmp_path / "a-masklabel.png"
    Image.new("L", (100, 100)).save(path)

    with pytest.raises(DataError, match=r"mask '.*a-masklabel\.png'.*and its image to the same"):
        load_mask(path, (100, 100), 16)


def test_image_size_refuses_a_png_that_can_never_load(tmp_path: Path, small_limit: int) -> None:
    path = tmp_path / "poster.png"
    Image.new("L", (80, 80)).save(path)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(DataError, match=r"poster\.png' is 80×80 \(6,400 pixels\)"):
            image_size(path)


def test_no_limit_loads_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    path = tmp_path / "a.png"
    Image.new("RGB", (40, 20), (255, 0, 0)).save(path)

    assert load_image(path, 8)[:, 4, 4].tolist() == [1.0, -1.0, -1.0]


# ------------------------------------------------------------------------------ unreadable files


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("bad-maxval.pgm", b"P5\n2 1\n0\n\x00\x00"),  # Pillow raises ValueError
        ("bad-header.jpg", b"\xff\xd8\xff" + b"\x00" * 40),  # the JPEG plugin: SyntaxError
        ("cut.jpg", b""),  # empty
    ],
)
def test_every_unreadable_file_is_a_data_error_naming_it(
    tmp_path: Path, name: str, content: bytes
) -> None:
    path = tmp_path / name
    path.write_bytes(content)

    with pytest.raises(DataError, match=rf"cannot read image '.*{name}'.*replace the file"):
        load_image(path, 16)
    with pytest.raises(DataError, match=rf"{name}"):
        image_size(path)


def test_a_missing_file_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"cannot read mask '.*gone-masklabel\.png'"):
        load_mask(tmp_path / "gone-masklabel.png", (8, 8), 8)


def test_a_truncated_jpeg_names_the_file(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    path = tmp_path / "cut.jpg"
    Image.fromarray(noise).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    with pytest.raises(DataError, match=r"cannot read image '.*cut\.jpg'"):
        load_image(path, 16)


# ------------------------------------------------------------------------------ image_size


def png_with_exif_after_the_pixels(path: Path, size: tuple[int, int]) -> Path:
    """A PNG whose eXIf chunk (orientation 6) comes after IDAT, where Pillow finds it only
    while decoding."""
    Image.new("RGB", size, (0, 128, 255)).save(path, exif=rotated_exif())
    data = path.read_bytes()
    chunks, offset = [], 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        chunks.append(data[offset : offset + 12 + length])
        offset += 12 + length
    exif = next(chunk for chunk in chunks if chunk[4:8] == b"eXIf")
    chunks.remove(exif)
    chunks.insert(len(chunks) - 1, exif)  # just before IEND
    path.write_bytes(data[:8] + b"".join(chunks))
    return path


def test_image_size_follows_exif_orientation_without_decoding(
    tmp_path: Path, no_decoding: None
) -> None:
    jpeg = tmp_path / "phone.jpg"
    Image.new("RGB", (40, 20)).save(jpeg, exif=rotated_exif())
    png = tmp_path / "plain.png"
    Image.new("RGB", (40, 20)).save(png)
    webp = tmp_path / "phone.webp"
    Image.new("RGB", (40, 20)).save(webp, exif=rotated_exif())

    assert image_size(jpeg) == (20, 40)
    assert image_size(png) == (40, 20)
    assert image_size(webp) == (20, 40)


def test_image_size_finds_a_png_exif_stored_after_the_pixels(tmp_path: Path) -> None:
    path = png_with_exif_after_the_pixels(tmp_path / "late.png", (40, 20))
    with Image.open(path) as opened:
        assert "exif" not in opened.info  # not seen before decoding

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded"))
        size = image_size(path)

    assert size == (20, 40)
    assert open_image(path).size == (20, 40)  # the decoded image agrees
    assert load_image(path, 8).shape == (3, 8, 8)
