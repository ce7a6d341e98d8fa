"""FLUX.1 Kontext: the reference image's tokens, prepared as ``FluxKontextPipeline`` prepares
them, and the transformer inputs made from them.

As the pipeline does (``__call__`` steps 3 and 4, ``prepare_latents``):

- The reference (an 8-bit picture) is resized with the pipeline's ``VaeImageProcessor``
  (Lanczos) to the preferred Kontext resolution nearest its aspect ratio (about one megapixel,
  ``model.flux1.reference_size=preferred``), or kept at its own size
  (``own``: the pipeline's ``_auto_resize=False``; a reference over one megapixel is scaled
  down to it first, keeping its aspect ratio), both floored to a multiple of 16 pixels.
- It is VAE-encoded (the posterior's mode), normalised ``(z - shift) * scale`` and packed
  2x2 like the target; its position ids are the target's scheme with the first coordinate 1
  instead of 0, on its own grid.
- The transformer reads the target's tokens, then the reference's: ``hidden_states`` and
  ``img_ids`` concatenated along the sequence; its output is sliced back to the target's
  tokens, so the loss and the masks cover the target only.

The encodings are named apart from the prompt's (``embeds``, ``pooled``) and cached with the
item by the conditioning slot (:class:`modules.models.base.ConditionedFamily`); ``predict``
gets them merged with the prompt, so the teacher gets exactly the student's reference.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS
from PIL import Image
from torch import Tensor

from modules.models.base import TextEncoding
from modules.models.model_folder import encode_shifted
from modules.models.packing import pack

TOKENS_KEY = "kontext_reference"
"""(B, L, 4C): the reference's packed latent tokens (zero-padded after an item's own L when
items with references of different sizes share a batch)."""
GRID_KEY = "kontext_reference_grid"
"""(B, 2) int64: each item's reference token grid (rows, columns), which says its own L."""
MAX_AREA = 1024**2
"""The most pixels a reference keeps (the pipeline's ``max_area``, its output's size)."""


def reference_size(width: int, height: int, *, multiple: int, mode: str) -> tuple[int, int]:
    """The (width, height) the pipeline resizes a reference of ``width`` x ``height`` to:
    ``preferred``, the preferred Kontext resolution nearest its aspect ratio; ``own``, its own
    size (at most :data:`MAX_AREA` pixels); both floored to ``multiple`` (at least one). The
    aspect ratio is the floored size's, as the pipeline's ``get_default_height_width``."""
    width, height = (max(multiple, side // multiple * multiple) for side in (width, height))
    if mode == "preferred":
        aspect = width / height
        _, width, height = min(
            (abs(aspect - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS
        )
    elif width * height > MAX_AREA:
        scale = math.sqrt(MAX_AREA / (width * height))
        width, height = round(width * scale), round(height * scale)
    return max(multiple, width // multiple * multiple), max(multiple, height // multiple * multiple)


def reference_pixels(image: Tensor, *, multiple: int, mode: str) -> Tensor:
    """(3, H, W) in [-1, 1] → (1, 3, H', W') in [-1, 1], resized and normalised by the
    pipeline's image processor from the 8-bit picture (what the pipeline is given)."""
    array = ((image.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0)
    picture = Image.fromarray(array.cpu().numpy())
    width, height = reference_size(*picture.size, multiple=multiple, mode=mode)
    processor = VaeImageProcessor(vae_scale_factor=multiple)
    resized = processor.resize(picture, height, width)
    return processor.preprocess(resized, height, width)


@torch.no_grad()
def encode_reference(vae: Any, vae_config: dict[str, Any], pixels: Tensor) -> TextEncoding:
    """(1, 3, H, W) reference pixels → ``{TOKENS_KEY: (1, h/2 * w/2, 4C), GRID_KEY: (1, 2)}``,
    the normalised posterior mode packed as the target (the pipeline's ``_encode_vae_image``
    with ``argmax`` and ``_pack_latents``)."""
    latent = encode_shifted(vae, vae_config, pixels)
    rows, columns = latent.shape[-2] // 2, latent.shape[-1] // 2
    return {
        TOKENS_KEY: pack(latent),  # (1, rows * columns, 4C)
        GRID_KEY: torch.tensor([[rows, columns]], dtype=torch.int64),
    }


def conditioned(encodings: TextEncoding) -> bool:
    """Whether ``encodings`` hold a reference (without one Kontext generates from the prompt
    alone, as the pipeline does without ``image``)."""
    return TOKENS_KEY in encodings


def grids(encodings: TextEncoding) -> list[tuple[int, int]]:
    """Each item's reference grid (rows, columns)."""
    return [(int(rows), int(columns)) for rows, columns in encodings[GRID_KEY].tolist()]


def reference_tokens(encodings: TextEncoding, row: int, grid: tuple[int, int]) -> Tensor:
    """Item ``row``'s reference tokens (1, rows * columns, 4C), its padding cut off."""
    return encodings[TOKENS_KEY][row : row + 1, : grid[0] * grid[1]]


def reference_ids(grid: tuple[int, int], device: torch.device) -> Tensor:
    """(rows * columns, 3) position ids of the reference tokens: (1, row, column), row-major
    (the pipeline's image ids, first coordinate 1)."""
    rows, columns = grid
    ids = torch.zeros(rows, columns, 3, device=device)
    ids[..., 0] = 1.0
    ids[..., 1] = torch.arange(rows, device=device)[:, None]
    ids[..., 2] = torch.arange(columns, device=device)[None, :]
    return ids.reshape(rows * columns, 3)
