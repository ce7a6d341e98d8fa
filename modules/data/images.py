"""Loading images and weighted masks as tensors with one shared geometry.

Geometry. Both are cropped to the centred box of the source with the training size's aspect
ratio and resized to that size (``size``: (width, height), or one side for a square): the same
as resizing to cover the size and centre-cropping, but done as one PIL resize with a (float)
source box (:func:`modules.data.buckets.crop_box`), so image and mask land on exactly the same
pixels whatever their rounding. A square size takes the centred square.

Values. Every mode Pillow opens is read at its real values, never through a conversion that
clips (``convert("RGB")`` turns 16-bit grey into white):

- 8-bit modes ("1", "L", "P", "RGB", "CMYK", "YCbCr", and "LA", "PA", "RGBA" with alpha) go
  through Pillow's own conversions to 8-bit RGB (colour masks: to luminance, ITU-R 601);
- 16-bit grey ("I;16", "I;16B", "I;16L") is value / 65535;
- "I" (32-bit integers: Pillow's mode for 16-bit PGM and 32-bit TIFF files, and older Pillows'
  for 16-bit PNGs) is value / 65535 when every value lies in 0..65535, as those 16-bit sources
  do; otherwise its 32 bits are read as unsigned, / (2^32 - 1): 32-bit integer exports (GIMP,
  Krita) are unsigned, and Pillow's signed "I" shows their bright half as negative numbers;
- "F" (32-bit float) is taken as 0..1 and clipped: float exports store white as 1.0, and
  values above it (HDR highlights) cannot be shown on an 8-bit scale either; NaN counts as 0;
- 16-bit RGB, RGBA and grey+alpha PNGs: Pillow itself opens them as 8-bit "RGB"/"RGBA" (the
  high byte of each sample), so they read within 1/255 of their true values.

Transparency is an alpha band or a transparency entry (a PNG ``tRNS`` chunk: a palette's alpha
values, or the one grey or colour value that is transparent). Images are composited over white
(the colours under alpha 0 are arbitrary); masks follow the rule in :func:`mask_image_to_tensor`.

Size. Pillow guards against decompression bombs with ``Image.MAX_IMAGE_PIXELS``: it warns
above the limit and raises ``DecompressionBombError`` (not an ``OSError``) above twice it. A
JPEG above the limit is decoded at a reduced scale (``draft``: 1/2, 1/4 or 1/8, the strongest
reduction that still covers the training size); any other image above it
stops the run with a :class:`DataError` naming the file, its size, the limit and the fix.
Every other failure to read a file is a :class:`DataError` too. The limit is never changed.
"""

from __future__ import annotations

import math
import os
import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image, ImageFile, JpegImagePlugin
from torch import Tensor

from modules.data.buckets import Size, crop_box
from modules.data.concept import DataError

SizeLike = Size | int
"""A training size: (width, height), or one side for a square."""

_DEEP_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
"""Single-band modes deeper than 8 bits: read with numpy, never through an 8-bit conversion."""
_GREY_MODES = _DEEP_MODES | {"1", "L"}
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_COLOUR_TOLERANCE = 8
"""Channel spread (of 255) above which a mask counts as coloured: JPEG noise stays below it."""
_JPEG_SIGNATURE = b"\xff\xd8\xff"
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
"""EXIF orientation → the transposition that shows the image upright (as ImageOps does)."""
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)
"""What Pillow raises for unreadable files: OSError (unknown format, truncated data, decoder
errors), SyntaxError (a plugin rejecting a header), ValueError (invalid header fields, e.g. a
PGM's maxval), EOFError and struct.error (headers cut short)."""


@dataclass(frozen=True)
class MaskNotes:
    """What a mask's decoding found that the trainer may want to tell the user about."""

    coloured: bool
    """Its R, G and B differ somewhere (by more than 8 of 255, among pixels not fully
    transparent): a colour mask, whose weights are its luminance, which may not be meant."""
    alpha_used: bool
    """It has an alpha channel (or transparency entry) that is not fully opaque, so the alpha
    rule of :func:`mask_image_to_tensor` applied."""


def load_image(path: Path, size: SizeLike) -> Tensor:
    """An RGB image as a float32 tensor (3, H, W) in [-1, 1] at ``size`` (W, H)."""
    image, _ = _open(path, "image", _size(size))
    return image_to_tensor(image, size)


def image_to_tensor(image: Image.Image, size: SizeLike) -> Tensor:
    """A decoded image (an image file's or a video frame's) as (3, H, W) in [-1, 1]."""
    width, height = _size(size)
    box = crop_box(image.size, (width, height))
    if image.mode in _DEEP_MODES or (image.mode in ("1", "L") and "transparency" in image.info):
        levels, alpha = _grey_planes(image)  # (H, W) each
        if alpha is not None:
            levels = levels * alpha + (1.0 - alpha)  # over white
        # LANCZOS as below; in float it can overshoot, hence the clip.
        grey = _resize_plane(levels, (width, height), box, Image.Resampling.LANCZOS)
        pixels = torch.from_numpy(grey.clip(0.0, 1.0)).mul(2.0).sub(1.0)  # (H, W)
        return pixels.expand(3, height, width).contiguous()  # (3, H, W)
    rgb = _over_white(image)
    # LANCZOS: the sharpest of PIL's filters; the uint8 result is clipped, so no overshoot.
    resized = rgb.resize((width, height), Image.Resampling.LANCZOS, box=box)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy())  # (H, W, 3)
    return pixels.permute(2, 0, 1).float().div(127.5).sub(1.0).contiguous()  # (3, H, W)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) as the image is shown, i.e. after its EXIF orientation.

    Reads the header only (no pixels are decoded), so it is cheap for every image of a run. It
    refuses, as :func:`load_image` will, an image too large to decode even at a reduced scale.
    """
    with _reading(path, "image"), _open_lazily(path) as image:
        size = _upright_size(image, path)
        pixels = size[0] * size[1]
        limit = Image.MAX_IMAGE_PIXELS
        # A JPEG decodes at down to 1/8 of each side: 1/64 of its pixels.
        reducible = 64 if image.format == "JPEG" else 1
        if limit is not None and pixels > limit * reducible:
            raise _too_large(path, "image", f"{size[0]}×{size[1]} ({pixels:,} pixels)", limit)
        return size


def load_mask(path: Path, image_size: tuple[int, int], size: SizeLike) -> Tensor:
    """A weighted mask as a float32 tensor (1, H, W) in [0, 1]; see :func:`load_mask_with_notes`."""
    return load_mask_with_notes(path, image_size, size)[0]


def load_mask_with_notes(
    path: Path, image_size: tuple[int, int], size: SizeLike
) -> tuple[Tensor, MaskNotes]:
    """A weighted mask (1, H, W) in [0, 1] at ``size`` (see :func:`mask_image_to_tensor`), cut
    and resized exactly as its image, and its notes, from one decoding of the file.

    The mask must have its image's size (``image_size``, width × height, as shown): anything
    else means it was drawn on another version of the image and would be misaligned. Sizes are
    compared as stored in the files, even when a huge JPEG mask was decoded at a reduced scale.
    """
    mask, stored = _open(path, "mask", _size(size))
    check_mask_size(path, stored, image_size)
    planes = _mask_planes(mask)
    return _weights_to_tensor(_weights(planes), _size(size)), _notes(planes)


def check_mask_size(path: Path, stored: tuple[int, int], image_size: tuple[int, int]) -> None:
    """A DataError naming the mask when its size (as shown) is not its image's: it was drawn
    on another version of the image and would be misaligned. The pre-flight checks this from
    the headers before a run loads its model."""
    if tuple(stored) != tuple(image_size):
        width, height = image_size
        raise DataError(
            f"mask '{path}' is {stored[0]}×{stored[1]} but its image is "
            f"{width}×{height}: re-export the mask at {width}×{height}"
        )


def mask_image_to_tensor(mask: Image.Image, size: SizeLike) -> Tensor:
    """A decoded mask (a mask file's or a mask video frame's) as (1, H, W) weights in [0, 1].

    The weight of a pixel is its grey level (the luminance of a colour mask) over its mode's
    full scale (255, or 65535 for 16-bit masks), unless the mask has an alpha channel (or a
    transparency entry, as "P" masks may) that is not fully opaque:

    - colour channels flat (one value over the whole image, e.g. white or black paint whose
      alpha marks the subject): the weight is the alpha / 255;
    - colour channels that vary: grey × alpha, transparent pixels being background.
    """
    return _weights_to_tensor(_weights(_mask_planes(mask)), _size(size))


def mask_notes(mask: Image.Image) -> MaskNotes:
    """Whether a decoded mask is coloured and whether its alpha was used (:class:`MaskNotes`)."""
    return _notes(_mask_planes(mask))


def mask_to_latent(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """Shrink a mask (1, H, W) to the latent grid (1, h, w) by area averaging.

    Each latent cell gets the mean weight of the pixels it covers (exact when H and W are
    multiples of h and w). Cells on a region's edge therefore get intermediate values ("soft
    edges"): a hard 1/0 border becomes e.g. 0.25 or 0.75 there. That matters for the prior
    threshold mode, which compares these latent-resolution values with the threshold.
    """
    if mask.dim() != 3 or mask.shape[0] != 1:
        raise ValueError(f"mask_to_latent expects a (1, H, W) mask, got {tuple(mask.shape)}")
    return F.interpolate(mask.unsqueeze(0), size=size, mode="area").squeeze(0)  # (1, h, w)


def open_image(path: Path, what: str = "image") -> Image.Image:
    """Decode an image file, upright; a DataError naming the file (as ``what``) if it cannot.

    Decoded at full size, so an image above Pillow's pixel limit is refused, JPEGs included:
    callers compare its size with others'.
    """
    return _open(path, what)[0]


# ------------------------------------------------------------------------------ opening files


def _open(path: Path, what: str, size: Size | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Decode the whole file now (PIL is lazy), upright per its EXIF orientation, and return it
    with its upright size as stored in the header.

    Given the training ``size``, a JPEG above the pixel limit is decoded at a reduced
    scale (the returned image is then smaller than the header size); anything else above the
    limit is refused.
    """
    with _reading(path, what), _open_lazily(path) as image:
        orientation = _orientation(image, path)
        upright = _upright(image.size, orientation)
        _fit_to_limit(image, path, what, _covering(size, image.size, orientation))
        image.load()
        method = _TRANSPOSE.get(orientation)
        # A copy either way: the file closes when this block ends.
        return (image.transpose(method) if method is not None else image.copy()), upright


def _open_lazily(path: Path) -> ImageFile.ImageFile:
    """The file opened with its header read and no pixels decoded.

    A JPEG is opened by its plugin directly: ``Image.open`` checks the size against the pixel
    limit and refuses a huge JPEG before ``draft()`` could have it decoded at a reduced scale.
    Its size is checked by :func:`_fit_to_limit` instead.
    """
    with open(path, "rb") as file:
        is_jpeg = file.read(len(_JPEG_SIGNATURE)) == _JPEG_SIGNATURE
    if is_jpeg:
        return JpegImagePlugin.JpegImageFile(path)
    return Image.open(path)


@contextmanager
def _reading(path: Path, what: str) -> Iterator[None]:
    """Turn whatever Pillow raises for ``path`` into a DataError naming the file and the fix."""
    try:
        yield
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        # Raised inside Image.open, before the size is known to us: Pillow's message has it.
        # (The warning is an exception only where warnings are turned into errors.)
        count = re.search(r"\((\d+) pixels\)", str(error))
        pixels = f"{int(count[1]):,} pixels" if count else "too many pixels"
        limit = Image.MAX_IMAGE_PIXELS or 0  # not None: Pillow checked against it
        raise _too_large(path, what, pixels, limit) from error
    except _DECODE_ERRORS as error:  # includes UnidentifiedImageError and truncated files
        raise DataError(
            f"cannot read {what} '{path}' ({error}): replace the file or remove it from the "
            "concept folder"
        ) from error


def _covering(size: Size | None, stored: Size, orientation: int) -> Size | None:
    """The smallest (width, height) of the stored image that still covers the training
    ``size`` once upright and cropped to its aspect ratio (what a reduced JPEG decode keeps)."""
    if size is None:
        return None
    upright = _upright(stored, orientation)
    scale = max(size[0] / upright[0], size[1] / upright[1])
    width, height = math.ceil(upright[0] * scale), math.ceil(upright[1] * scale)
    return _upright((width, height), orientation)


def _fit_to_limit(image: ImageFile.ImageFile, path: Path, what: str, cover: Size | None) -> None:
    """Have a JPEG above the pixel limit decoded at a reduced scale, or refuse the image."""
    limit = Image.MAX_IMAGE_PIXELS  # read now: users may raise it (or set None) for their run
    if limit is None or image.size[0] * image.size[1] <= limit:
        return
    width, height = image.size
    found = f"{width}×{height} ({width * height:,} pixels)"
    if image.format == "JPEG" and cover is not None:
        # The largest of 1/2, 1/4, 1/8 that keeps both sides at least ``cover``'s.
        image.draft(image.mode, cover)
        if image.size[0] * image.size[1] <= limit:
            return
        found += f", still {image.size[0]}×{image.size[1]} decoded at a reduced scale"
    raise _too_large(path, what, found, limit)


def _too_large(path: Path, what: str, found: str, limit: int) -> DataError:
    other = "its image" if what == "mask" else "its mask, if any,"
    return DataError(
        f"{what} '{path}' is {found}, over the limit of {limit:,} pixels that guards "
        "against decompression bombs (PIL.Image.MAX_IMAGE_PIXELS): downscale it below the "
        f"limit, and {other} to the same size (training needs far fewer pixels)"
    )


def _orientation(image: ImageFile.ImageFile, path: Path) -> int:
    """The EXIF orientation (1 to 8; 1 is upright), read without decoding the pixels."""
    if image.format == "PNG" and "exif" not in image.info:
        # Pillow reads an eXIf chunk stored after the pixel data only while decoding them (its
        # PngImageFile.getexif decodes the whole image to look); find the chunk ourselves.
        late = _png_exif_after_pixels(path)
        if late is not None:
            image.info["exif"] = late
        exif = Image.Image.getexif(image)
    else:
        exif = image.getexif()
    orientation = exif.get(ExifTags.Base.Orientation, 1)
    return orientation if orientation in _TRANSPOSE else 1


def _png_exif_after_pixels(path: Path) -> bytes | None:
    """The data of a PNG's eXIf chunk, or None: walks the chunk headers and seeks past their
    data (8 bytes read per chunk), so it costs little however large the image."""
    with open(path, "rb") as file:
        file.seek(8)  # the PNG signature
        while len(header := file.read(8)) == 8:
            length, kind = struct.unpack(">I4s", header)
            if kind == b"eXIf":
                return file.read(length)
            if kind == b"IEND":
                return None
            file.seek(length + 4, os.SEEK_CUR)  # the data and its CRC
    return None


def _upright(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(width, height) once transposed per ``orientation``: 5 to 8 turn by 90°."""
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else (size[0], size[1])


def _upright_size(image: ImageFile.ImageFile, path: Path) -> tuple[int, int]:
    return _upright(image.size, _orientation(image, path))


# ------------------------------------------------------------------------------ pixel values


def _grey_planes(image: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """A single-band image's levels (H, W) float32 in [0, 1] and its alpha (H, W), 0 where the
    pixel has the transparent value of its transparency entry, 1 elsewhere; None without one."""
    raw = np.asarray(image)  # (H, W): bool ("1"), uint8, uint16 ("I;16*"), int32, float32
    if image.mode == "F":
        levels = np.nan_to_num(raw, nan=0.0).clip(0.0, 1.0)
    elif image.mode == "I" and (raw.min(initial=0) < 0 or raw.max(initial=0) > 65535):
        levels = raw.view(np.uint32) / 4294967295.0  # the 32 bits as unsigned: see the top
    else:
        full_scale = {"1": 1.0, "L": 255.0}.get(image.mode, 65535.0)
        levels = raw / full_scale
    transparent = image.info.get("transparency")
    alpha = None
    if isinstance(transparent, int):
        alpha = (raw != transparent).astype(np.float32)
    return levels.astype(np.float32), alpha


def _over_white(image: Image.Image) -> Image.Image:
    """An 8-bit image as RGB, transparent areas over white: the colours under alpha 0 are
    arbitrary."""
    if image.mode == "La":
        image = image.convert("LA")  # Pillow converts premultiplied "La" only to "LA"
    if image.mode not in _ALPHA_MODES and "transparency" not in image.info:
        return image.convert("RGB")
    rgba = image.convert("RGBA")  # applies a transparency entry as alpha
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


@dataclass(frozen=True)
class _MaskPlanes:
    grey: np.ndarray
    """(H, W) float32 in [0, 1]: grey level or luminance over the full scale."""
    alpha: np.ndarray | None
    """(H, W) float32 in [0, 1], or None for masks without transparency."""
    colours: np.ndarray | None
    """(H, W, 3) uint8 RGB of colour masks; None for single-band ones."""


def _mask_planes(mask: Image.Image) -> _MaskPlanes:
    if mask.mode in _GREY_MODES:
        grey, alpha = _grey_planes(mask)
        return _MaskPlanes(grey, alpha, None)
    if mask.mode in ("LA", "La"):
        pairs = np.asarray(mask.convert("LA"), dtype=np.float32) / 255.0  # (H, W, 2)
        return _MaskPlanes(pairs[..., 0], pairs[..., 1], None)
    has_alpha = mask.mode in _ALPHA_MODES or "transparency" in mask.info
    colour = mask.convert("RGBA" if has_alpha else "RGB")  # P, CMYK, YCbCr...: 8-bit RGB
    pixels = np.asarray(colour)  # (H, W, 3 or 4) uint8
    # convert("L") weighs R, G, B by their luminance (ITU-R 601) and ignores alpha.
    grey = np.asarray(colour.convert("L"), dtype=np.float32) / 255.0
    alpha = pixels[..., 3].astype(np.float32) / 255.0 if has_alpha else None
    return _MaskPlanes(grey, alpha, pixels[..., :3])


def _weights(planes: _MaskPlanes) -> np.ndarray:
    """Per-pixel weights (H, W) float32 in [0, 1] by the rule of :func:`mask_image_to_tensor`."""
    alpha = planes.alpha
    if alpha is None or alpha.min() >= 1.0:
        return planes.grey
    colours = planes.colours if planes.colours is not None else planes.grey  # (H, W, 3) or (H, W)
    first = colours.reshape(-1, *colours.shape[2:])[0]  # the first pixel's value(s)
    flat = bool((colours == first).all())
    return alpha if flat else planes.grey * alpha


def _notes(planes: _MaskPlanes) -> MaskNotes:
    alpha_used = planes.alpha is not None and bool(planes.alpha.min() < 1.0)
    coloured = False
    if planes.colours is not None:
        spread = np.ptp(planes.colours, axis=2)  # (H, W) uint8: max - min of R, G, B
        if planes.alpha is not None:
            spread = spread[planes.alpha > 0.0]  # colours under alpha 0 are not seen
        coloured = spread.size > 0 and int(spread.max()) > _COLOUR_TOLERANCE
    return MaskNotes(coloured=coloured, alpha_used=alpha_used)


def _weights_to_tensor(weights: np.ndarray, size: Size) -> Tensor:
    """Weights cropped and resized like the image, as (1, H, W) in [0, 1] at ``size``."""
    rows, columns = weights.shape
    # BOX: exact area averaging when shrinking, so grey levels inside a region are kept exactly
    # and nothing rings outside [0, 1] (LANCZOS would); float ("F") avoids rounding.
    resized = _resize_plane(weights, size, crop_box((columns, rows), size), Image.Resampling.BOX)
    return torch.from_numpy(resized).clamp_(0.0, 1.0).unsqueeze(0)  # (H, W) -> (1, H, W)


def _resize_plane(
    plane: np.ndarray,
    size: Size,
    box: tuple[float, float, float, float],
    resample: Image.Resampling,
) -> np.ndarray:
    """A float plane cropped to ``box`` and resized to ``size`` (W, H), as float32 (H, W)."""
    image = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32))  # mode "F"
    resized = image.resize(size, resample, box=box)
    return np.asarray(resized, dtype=np.float32).copy()  # (H, W), writable


def _size(size: SizeLike) -> Size:
    """(width, height) of a training size given as a pair or as a square's side."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
