"""Images of every mode and bit depth Pillow opens read at their real values (16-bit grey is not
white), transparency over white, and the same rules for clips made of frame images."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modules.data.images import image_to_tensor, load_image
from modules.data.video import clip_info, load_clip
from tests.data.video_files import write_frames


def unit(image: torch.Tensor) -> torch.Tensor:
    """[-1, 1] → [0, 1]."""
    return (image + 1.0) / 2.0


def halves(left: np.ndarray | int, right: np.ndarray | int, dtype=np.uint8) -> np.ndarray:
    """An 8×8 (H, W) or (H, W, C) array: columns 0-3 are ``left``, 4-7 ``right``."""
    left, right = np.asarray(left, dtype=dtype), np.asarray(right, dtype=dtype)
    row = np.stack([left] * 4 + [right] * 4)  # (8,) or (8, C)
    return np.stack([row] * 8)  # (8, 8) or (8, 8, C)


def left_right(image: torch.Tensor) -> tuple[list[float], list[float]]:
    """The [0, 1] RGB of a (3, 8, 8) image in its left and right halves."""
    values = unit(image)
    return values[:, 4, 1].tolist(), values[:, 4, 6].tolist()


def write_png16(path: Path, samples: np.ndarray, colour_type: int) -> Path:
    """A 16-bit PNG from (H, W) or (H, W, C) samples (0 grey, 2 RGB, 4 grey+alpha, 6 RGBA):
    Pillow cannot write 16-bit colour PNGs itself."""
    height, width = samples.shape[:2]
    rows = samples.reshape(height, -1).astype(">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    return path


# ------------------------------------------------------------------------------ 16-bit grey


def test_sixteen_bit_grey_ramp_is_not_white(tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, 16).round().astype(np.uint16)[None, :].repeat(16, axis=0)
    path = tmp_path / "ramp.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "I;16"

    image = load_image(path, 16)

    expected = torch.from_numpy(ramp[0] / 65535.0).float()
    for channel in range(3):
        torch.testing.assert_close(unit(image[channel, 8]), expected, atol=1e-4, rtol=0)
    assert image.min() < -0.99  # the dark end is black, not clipped to white


def _grey16_png(path: Path, values: np.ndarray) -> Path:
    Image.fromarray(values).save(path.with_suffix(".png"))
    return path.with_suffix(".png")


def _grey16_big_endian_tiff(path: Path, values: np.ndarray) -> Path:
    height, width = values.shape
    raw = values.astype(">u2").tobytes()
    Image.frombytes("I;16B", (width, height), raw).save(path.with_suffix(".tif"))
    return path.with_suffix(".tif")


def _grey16_little_endian_tiff(path: Path, values: np.ndarray) -> Path:
    height, width = values.shape
    raw = values.astype("<u2").tobytes()
    Image.frombytes("I;16L", (width, height), raw).save(path.with_suffix(".tif"))
    return path.with_suffix(".tif")


def _grey16_pgm(path: Path, values: np.ndarray) -> Path:
    height, width = values.shape
    header = b"P5\n%d %d\n65535\n" % (width, height)
    path.with_suffix(".pgm").write_bytes(header + values.astype(">u2").tobytes())
    return path.with_suffix(".pgm")


def _grey16_png_by_hand(path: Path, values: np.ndarray) -> Path:
    return write_png16(path.with_suffix(".png"), values, 0)


@pytest.mark.parametrize(
    ("write", "mode"),
    [
        (_grey16_png, "I;16"),
        (_grey16_big_endian_tiff, "I;16B"),
        (_grey16_little_endian_tiff, "I;16"),
        (_grey16_pgm, "I"),  # Pillow opens 16-bit PGMs (older Pillows 16-bit PNGs too) as "I"
        (_grey16_png_by_hand, "I;16"),
    ],
    ids=["png", "tiff-big-endian", "tiff-little-endian", "pgm-as-I", "png-by-hand"],
)
def test_sixteen_bit_mid_grey_is_zero(tmp_path: Path, write, mode: str) -> None:
    values = halves(32768, 65535, dtype=np.uint16)
    path = write(tmp_path / "grey", values)
    assert Image.open(path).mode == mode

    left, right = left_right(load_image(path, 8))

    assert left == pytest.approx([32768 / 65535] * 3, abs=1e-4)  # ≈ 0.0 in [-1, 1]
    assert right == pytest.approx([1.0] * 3, abs=1e-4)


@pytest.mark.parametrize("mode", ["I;16", "I;16L", "I;16B", "I"])
def test_decoded_sixteen_bit_modes_use_the_sixteen_bit_scale(mode: str) -> None:
    values = halves(16384, 49152, dtype=np.uint16)
    raw = values.astype(">u2" if mode == "I;16B" else "<u2").tobytes()
    if mode == "I":
        image = Image.fromarray(values.astype(np.int32))  # mode "I"
    else:
        image = Image.frombytes(mode, (8, 8), raw)
    assert image.mode == mode

    left, right = left_right(image_to_tensor(image, 8))

    assert left == pytest.approx([0.25] * 3, abs=1e-4)
    assert right == pytest.approx([0.75] * 3, abs=1e-4)


# ------------------------------------------------------------------------------ 32-bit modes


def test_thirty_two_bit_integer_beyond_sixteen_bits_reads_as_unsigned(tmp_path: Path) -> None:
    # An unsigned 32-bit TIFF (the 32-bit integer export of GIMP or Krita): Pillow opens it as
    # signed "I", so its bright half arrives negative. Pillow writes signed TIFFs only: flip the
    # SampleFormat tag (339) from 2 (signed) to 1 (unsigned).
    stored = np.array([0, 2**31, 2**32 - 1, 2**30], dtype=np.uint32)
    values = np.repeat(stored, 2)[None, :].repeat(8, axis=0)  # (8, 8)
    path = tmp_path / "deep.tif"
    Image.fromarray(values.view(np.int32)).save(path)
    signed = struct.pack("<HHII", 339, 3, 1, 2)
    data = path.read_bytes()
    assert data.count(signed) == 1
    path.write_bytes(data.replace(signed, struct.pack("<HHII", 339, 3, 1, 1)))
    opened = Image.open(path)
    assert opened.mode == "I"
    assert opened.getpixel((4, 0)) == -1  # 2^32 - 1 seen as signed

    row = unit(load_image(path, 8))[0, 4]

    expected = [0.0, 0.0, 0.5, 0.5, 1.0, 1.0, 0.25, 0.25]
    assert row.tolist() == pytest.approx(expected, abs=1e-4)


def test_float_image_is_taken_as_zero_to_one_and_clipped(tmp_path: Path) -> None:
    stored = np.array([-0.5, 0.0, 0.25, 0.5, 1.0, 2.5, np.nan, 0.75], dtype=np.float32)
    path = tmp_path / "float.tif"
    Image.fromarray(stored[None, :].repeat(8, axis=0)).save(path)
    assert Image.open(path).mode == "F"

    row = unit(load_image(path, 8))[1, 4]

    expected = [0.0, 0.0, 0.25, 0.5, 1.0, 1.0, 0.0, 0.75]  # NaN counts as 0
    assert row.tolist() == pytest.approx(expected, abs=1e-4)


# ------------------------------------------------------------------------------ 8-bit and colour


def _one_bit(path: Path) -> Path:
    Image.fromarray(halves(0, 1, dtype=bool)).save(path)
    return path


def _grey(path: Path) -> Path:
    Image.fromarray(halves(30, 200)).save(path)
    return path


def _grey_alpha(path: Path) -> Path:
    Image.fromarray(halves([0, 0], [100, 255]), "LA").save(path)  # left fully transparent
    return path


def _palette(path: Path, transparent: bool) -> Path:
    image = Image.fromarray(halves(0, 1), "P")
    image.putpalette([255, 0, 0, 0, 0, 255])
    image.save(path, **({"transparency": 0} if transparent else {}))
    return path


def _rgba(path: Path) -> Path:
    Image.fromarray(halves([0, 0, 0, 128], [10, 20, 30, 255]), "RGBA").save(path)
    return path


def _rgb_with_transparent_colour(path: Path) -> Path:
    Image.fromarray(halves([1, 2, 3], [200, 100, 50])).save(path, transparency=(1, 2, 3))
    return path


def _grey_with_transparent_value(path: Path) -> Path:
    Image.fromarray(halves(5, 60)).save(path, transparency=5)
    return path


def _grey16_with_transparent_value(path: Path) -> Path:
    Image.fromarray(halves(7, 32768, dtype=np.uint16)).save(path, transparency=7)
    return path


def _rgb16(path: Path) -> Path:
    # 16-bit samples; Pillow keeps the high byte: 51455 → 200, 32768 → 128.
    return write_png16(path, halves([65535, 0, 32768], [51455, 2560, 0], np.uint16), 2)


def _rgba16(path: Path) -> Path:
    return write_png16(path, halves([0, 0, 0, 0], [51455, 2560, 0, 65535], np.uint16), 6)


def _grey_alpha16(path: Path) -> Path:
    return write_png16(path, halves([0, 0], [32768, 65535], np.uint16), 4)


def _cmyk_jpeg(path: Path) -> Path:
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path.with_suffix(".jpg"), quality=95)
    return path.with_suffix(".jpg")


def _ycbcr_tiff(path: Path) -> Path:
    Image.new("YCbCr", (8, 8), (128, 128, 128)).save(path.with_suffix(".tif"))
    return path.with_suffix(".tif")


RED, BLUE, WHITE = [1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("write", "mode", "left", "right"),
    [
        (_one_bit, "1", [0.0] * 3, WHITE),
        (_grey, "L", [30 / 255] * 3, [200 / 255] * 3),
        (_grey_alpha, "LA", WHITE, [100 / 255] * 3),
        (lambda path: _palette(path, transparent=False), "P", RED, BLUE),
        (lambda path: _palette(path, transparent=True), "P", WHITE, BLUE),
        (_rgba, "RGBA", [127 / 255] * 3, [10 / 255, 20 / 255, 30 / 255]),
        (_rgb_with_transparent_colour, "RGB", WHITE, [200 / 255, 100 / 255, 50 / 255]),
        (_grey_with_transparent_value, "L", WHITE, [60 / 255] * 3),
        (_grey16_with_transparent_value, "I;16", WHITE, [32768 / 65535] * 3),
        (_rgb16, "RGB", [1.0, 0.0, 128 / 255], [200 / 255, 10 / 255, 0.0]),
        (_rgba16, "RGBA", WHITE, [200 / 255, 10 / 255, 0.0]),
        (_grey_alpha16, "RGBA", WHITE, [128 / 255] * 3),
        (_cmyk_jpeg, "CMYK", RED, RED),
        (_ycbcr_tiff, "YCbCr", [128 / 255] * 3, [128 / 255] * 3),
    ],
    ids=[
        "1",
        "L",
        "LA",
        "P",
        "P-transparent",
        "RGBA",
        "RGB-tRNS",
        "L-tRNS",
        "I;16-tRNS",
        "RGB-16-bit",
        "RGBA-16-bit",
        "LA-16-bit",
        "CMYK-jpeg",
        "YCbCr-tiff",
    ],
)
def test_every_mode_reads_its_real_colours_over_white(
    tmp_path: Path, write, mode: str, left: list[float], right: list[float]
) -> None:
    path = write(tmp_path / "image.png")
    assert Image.open(path).mode == mode

    got_left, got_right = left_right(load_image(path, 8))

    tolerance = 3 / 255 if path.suffix == ".jpg" else 1e-4
    assert got_left == pytest.approx(left, abs=tolerance)
    assert got_right == pytest.approx(right, abs=tolerance)


def test_sixteen_bit_image_shrinks_in_float_without_ringing(tmp_path: Path) -> None:
    # A hard black/white edge shrunk with LANCZOS overshoots in float; values stay in [-1, 1].
    values = np.zeros((64, 64), dtype=np.uint16)
    values[:, 32:] = 65535
    path = tmp_path / "edge.png"
    Image.fromarray(values).save(path)

    image = load_image(path, 16)

    assert image.shape == (3, 16, 16)
    assert image.dtype == torch.float32
    assert image.min() >= -1.0 and image.max() <= 1.0
    assert image[0, 8, 0] == pytest.approx(-1.0, abs=1e-4)
    assert image[0, 8, 15] == pytest.approx(1.0, abs=1e-4)


# ------------------------------------------------------------------------------ clips


def test_a_folder_of_sixteen_bit_frames_reads_its_real_levels(tmp_path: Path) -> None:
    levels = np.array([8192, 32768, 57344], dtype=np.uint16)
    frames = np.broadcast_to(levels[:, None, None], (3, 8, 8)).copy()  # (F, H, W)
    folder = write_frames(tmp_path / "clip", frames)
    assert Image.open(folder / "frame1.png").mode == "I;16"
    info = clip_info(folder)

    clip = load_clip(folder, [0, 1, 2], 8)  # (3, F, R, R)

    means = unit(clip).mean(dim=(0, 2, 3))
    torch.testing.assert_close(means, torch.from_numpy(levels / 65535.0).float(), atol=1e-4, rtol=0)
    assert info.size == (8, 8)
