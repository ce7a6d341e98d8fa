"""FLUX.2 editing: reference images as ``Flux2Pipeline`` / ``Flux2KleinPipeline`` take them
(``image=``), and the transformer inputs made from them.

As the pipelines do, each reference:

- keeps its own aspect ratio: resized (LANCZOS) to an area of 1024 x 1024 only when larger, then
  centre-cropped to multiples of 16 px (the VAE factor times the 2x2 patch), with the pipelines'
  own image processor (:func:`prepare_reference`); one smaller than 64 px or more elongated than
  8:1 is refused, as the pipelines refuse it;
- is VAE-encoded to the posterior's mode, patchified and normalised like the targets' latents,
  and packed into tokens, one per 16 px cell, (n, 128);
- gets position ids (T, row, column, 0) with its own time index T = 10, 20, 30, ... (the
  pipelines' ``_prepare_image_ids``), so the transformer tells the references apart from each
  other and from the target (T = 0).

The references' tokens follow the target's in the transformer's image stream; the prediction
is sliced back to the target's tokens (:func:`references_of`, used by ``predict`` and
``sample``), so the loss and the masks cover the target only.

An item's encodings (named apart from the prompt's ``embeds``, cached by the conditioning slot):
``reference_latents`` (1, N, 128), N the tokens of all its references; ``reference_ids`` (1, N,
4); ``reference_tokens`` (1, 1), N itself, so that a batch whose items' references differ in
size (zero-padded to the longest by the data loader) is run item group by item group, each
with its own references unpadded (the transformer takes one set of position ids per call).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor
from PIL import Image
from torch import Tensor

from modules.data.concept import DataError
from modules.models.base import TextEncoding

LATENTS_KEY = "reference_latents"
IDS_KEY = "reference_ids"
TOKENS_KEY = "reference_tokens"
KEYS = (LATENTS_KEY, IDS_KEY, TOKENS_KEY)
MAX_AREA = 1024 * 1024
"""References larger than this many pixels are resized down to it (the pipelines' limit)."""
TIME_STEP = 10
"""Reference i (from 0) gets time index ``TIME_STEP * (i + 1)``, as ``_prepare_image_ids``."""


def prepare_reference(image: Tensor, multiple: int) -> Tensor:
    """(3, H, W) in [-1, 1], an image at its own size → (1, 3, h, w) in [-1, 1] as the pipelines
    prepare an ``image=`` reference: at most 1024 x 1024 px in area, its own aspect ratio,
    cropped to multiples of ``multiple`` (16)."""
    picture = Image.fromarray(_to_uint8(image))
    try:
        Flux2ImageProcessor.check_image_input(picture)
    except ValueError as error:
        width, height = picture.size
        raise DataError(
            f"a reference image of {width} x {height} px is one the FLUX.2 pipelines refuse "
            f"({error}): use references at least 64 px a side and at most 8:1"
        ) from None
    processor = Flux2ImageProcessor(vae_scale_factor=multiple)
    width, height = picture.size
    if width * height > MAX_AREA:
        picture = processor._resize_to_target_area(picture, MAX_AREA)
        width, height = picture.size
    width, height = width // multiple * multiple, height // multiple * multiple
    return processor.preprocess(picture, height=height, width=width, resize_mode="crop")


def reference_ids(grids: Sequence[tuple[int, int]], device: torch.device) -> Tensor:
    """(N, 4) position ids (T, row, column, 0) of references of ``grids`` (rows, columns) cells,
    reference i at T = 10 (i + 1), row-major within each."""
    ids = []
    for i, (rows, columns) in enumerate(grids):
        grid = torch.zeros(rows, columns, 4, dtype=torch.long, device=device)
        grid[..., 0] = TIME_STEP * (i + 1)
        grid[..., 1] = torch.arange(rows, device=device)[:, None]
        grid[..., 2] = torch.arange(columns, device=device)[None, :]
        ids.append(grid.reshape(rows * columns, 4))
    return torch.cat(ids)


def encode_references(
    images: Sequence[Tensor], encode: Callable[[Tensor], Tensor], multiple: int
) -> TextEncoding:
    """One item's references, each (3, H, W) at its own size → its encodings (batch of one);
    ``encode``: (1, 3, h, w) → normalised patchified latents (1, 128, h/16, w/16)."""
    if not images:
        raise ValueError("FLUX.2 editing: an item without reference images")
    latents = [encode(prepare_reference(image, multiple)) for image in images]
    tokens = torch.cat([pack_one(latent) for latent in latents])  # (N, 128)
    ids = reference_ids([tuple(latent.shape[-2:]) for latent in latents], tokens.device)
    count = torch.tensor([[tokens.shape[0]]], dtype=torch.long)
    return {LATENTS_KEY: tokens[None].float(), IDS_KEY: ids[None].cpu(), TOKENS_KEY: count}


def pack_one(latent: Tensor) -> Tensor:
    """(1, C, h, w) → (h * w, C): the pipelines' ``_pack_latents`` of one image."""
    return latent[0].flatten(1).transpose(0, 1)


@dataclass(frozen=True)
class ReferenceGroup:
    """Items of a batch whose references have one layout (count and sizes)."""

    index: list[int]
    """The items' places in the batch."""
    latents: Tensor
    """(b, N, 128) their reference tokens, padding removed."""
    ids: Tensor
    """(N, 4) the position ids they share."""


def references_of(text: TextEncoding) -> list[ReferenceGroup] | None:
    """The batch's references grouped by layout (one group when the items' references have the
    same sizes, as with one item); None without references (text-to-image)."""
    if LATENTS_KEY not in text:
        return None
    latents, ids = text[LATENTS_KEY], text[IDS_KEY]
    lengths = [int(n) for n in text[TOKENS_KEY].reshape(-1).tolist()]
    groups: list[list[int]] = []
    for i, length in enumerate(lengths):
        for group in groups:
            first = group[0]
            if lengths[first] == length and torch.equal(ids[i, :length], ids[first, :length]):
                group.append(i)
                break
        else:
            groups.append([i])
    return [
        ReferenceGroup(
            index=group,
            latents=latents[group, : lengths[group[0]]],
            ids=ids[group[0], : lengths[group[0]]],
        )
        for group in groups
    ]


def _to_uint8(image: Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] → (H, W, 3) uint8: exact for pixels read from an 8-bit file."""
    pixels = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(1, 2, 0).numpy()
