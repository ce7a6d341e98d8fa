"""Parameter-free stand-ins for a model family's image and prompt encoders."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

PROMPT_LENGTH = 16


class StandInEncoders:
    """Parameter-free encoders that count their calls.

    Images: ``pixel_unshuffle(x, 4)``, (B, 3, R, R) → (B, 48, R/4, R/4). Prompts: the first
    PROMPT_LENGTH character codes as (B, L, 1) embeddings plus a (B, L) attention mask.
    """

    def __init__(self) -> None:
        self.image_calls = 0
        self.prompt_calls = 0
        self.images_encoded = 0

    def encode_images(self, images: Tensor) -> Tensor:
        self.image_calls += 1
        self.images_encoded += images.shape[0]
        return F.pixel_unshuffle(images, 4)

    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        self.prompt_calls += 1
        return encode_prompt_codes(prompts)


def encode_prompt_codes(prompts: list[str]) -> dict[str, Tensor]:
    codes = torch.zeros(len(prompts), PROMPT_LENGTH)
    for row, prompt in enumerate(prompts):
        values = [float(ord(char)) for char in prompt[:PROMPT_LENGTH]]
        codes[row, : len(values)] = torch.tensor(values)
    return {"embeds": codes.unsqueeze(-1), "attention_mask": (codes != 0).long()}
