"""Loading images and weighted masks as tensors with one shared geometry.

Both are cropped to the centred square of the source and resized to ``resolution``: the same as
resizing the short side to ``resolution`` and centre-cropping, but done as one PIL resize with a
(float) source box, so image and mask land on exactly the same pixels whatever their rounding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor

from modules.data.concept import DataError

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def load_image(path: Path, resolution: int) -> Tensor:
    """An RGB image as a float32 tensor (3, R, R) in [-1, 1]."""
    return image_to_tensor(_open(path, "image"), resolution)


def image_to_tensor(image: Image.Image, resolution: int) -> Tensor:
    """A decoded image (an image file's or a video frame's) as (3, R, R) in [-1, 1]."""
    image = _to_rgb(image)
    # LANCZOS: the sharpest of PIL's filters; the uint8 result is clipped, so no overshoot.
    square = image.resize(
        (resolution, resolution), Image.Resampling.LANCZOS, box=_centre_square(image.size)
    )
    pixels = torch.from_numpy(np.asarray(square, dtype=np.uint8).copy())  # (R, R, 3)
    return pixels.permute(2, 0, 1).float().div(127.5).sub(1.0).contiguous()  # (3, R, R)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) as the image is shown, i.e. after its EXIF orientation."""
    return _open(path, "image").size


def load_mask(path: Path, image_size: tuple[int, int], resolution: int) -> Tensor:
    """A weighted mask as a float32 tensor (1, R, R) in [0, 1]: grey value / 255.

    The mask must have its image's size (``image_size``, width × height): anything else means it
    was drawn on another version of the image and would be misaligned.
    """
    mask = _open(path, "mask")
    if mask.size != tuple(image_size):
        width, height = image_size
        raise DataError(
            f"mask '{path}' is {mask.size[0]}×{mask.size[1]} but its image is "
            f"{width}×{height}: re-export the mask at {width}×{height}"
        )
    return mask_image_to_tensor(mask, resolution)


def mask_image_to_tensor(mask: Image.Image, resolution: int) -> Tensor:
    """A decoded mask (a mask file's or a mask video frame's) as (1, R, R) weights in [0, 1]."""
    grey, full_scale = _to_grey(mask)
    # BOX: exact area averaging when shrinking, so grey levels inside a region are kept exactly
    # and nothing rings outside [0, 1] (LANCZOS would); it works in float ("F") to avoid rounding.
    square = grey.resize(
        (resolution, resolution), Image.Resampling.BOX, box=_centre_square(grey.size)
    )
    weights = torch.from_numpy(np.asarray(square, dtype=np.float32).copy()) / full_scale
    return weights.clamp_(0.0, 1.0).unsqueeze(0)  # (R, R) -> (1, R, R)


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
    """Decode an image file, upright; a DataError naming the file (as ``what``) if it cannot."""
    return _open(path, what)


def _open(path: Path, what: str) -> Image.Image:
    """Decode the whole file now (PIL is lazy), upright per its EXIF orientation."""
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image)
    except OSError as error:  # includes UnidentifiedImageError and truncated files
        raise DataError(
            f"cannot read {what} '{path}' ({error}): replace the file or remove it from the "
            "concept folder"
        ) from error


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparent areas over white: the colours hidden under alpha 0 are arbitrary."""
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _to_grey(mask: Image.Image) -> tuple[Image.Image, float]:
    """A float ("F") greyscale image and its full-scale value (255, or 65535 for 16-bit PNGs)."""
    if mask.mode in _SIXTEEN_BIT_MODES:
        return mask.convert("F"), 65535.0
    # convert("L") uses the luminance (ITU-R 601) for RGB/RGBA/palette masks.
    return mask.convert("L").convert("F"), 255.0


def _centre_square(size: tuple[int, int]) -> tuple[float, float, float, float]:
    """The centred square crop box (left, top, right, bottom) of a width × height image."""
    width, height = size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)
