"""The 2x2 token packing of the packed-token families (FLUX.1, FLUX.2, Qwen-Image).

Their transformers read each 2x2 patch of the latent grid as one token. The families pack inside
``predict`` and unpack the prediction, so masks and the loss stay on the latent grid.
"""

from __future__ import annotations

from torch import Tensor


def pack(latents: Tensor) -> Tensor:
    """(B, C, h, w) → (B, h/2 * w/2, 4C): each 2x2 patch one token, row-major, its values in
    the order (c, dy, dx), as the pipelines' ``_pack_latents``."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: Tensor, channels: int, height: int, width: int) -> Tensor:
    """The inverse of :func:`pack`: (B, h/2 * w/2, 4C) → (B, C, h, w)."""
    b = tokens.shape[0]
    patches = tokens.view(b, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels, height, width)
