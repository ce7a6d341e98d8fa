"""WAN image-to-video: the first frame's conditioning, built as ``WanImageToVideoPipeline``
builds it, and the denoiser inputs made from it.

The forms (:func:`modules.models.wan.wan_form`):

- WAN 2.1 I2V and WAN 2.2 I2V A14B: the VAE latent of the clip [first frame, F - 1 black
  frames], normalised, and 4 mask channels (1 on latent frame 0, the given frame; 0 after) are
  concatenated after the noisy latents along the channels: 16 + 4 + 16 = 36 input channels.
  WAN 2.1 also gives the transformer the CLIP vision encoder's ``hidden_states[-2]`` of the
  first frame (``encoder_hidden_states_image``).
- WAN 2.2 TI2V 5B, ``model.wan.task=image_to_video``: the first frame encoded alone is latent
  frame 0, clean, in place of the noisy one, and its tokens get timestep 0 (per-token
  timesteps); the model predicts the other frames only, so only they carry the loss and the
  masks (:func:`predicted_frames`).

The encodings are named apart from the prompt's (``embeds``) and cached with the item by the
conditioning slot (:class:`modules.models.base.ConditionedFamily`); ``predict`` receives them
merged with the prompt, so the teacher gets exactly the student's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from modules.models.base import TextEncoding
from modules.models.spec import read_json

VIDEO_KEY = "first_frame_video"
"""2.1 / 2.2 I2V: (B, 16, F', h, w), the normalised latent of [first frame, black frames]."""
IMAGE_KEY = "first_frame_image"
"""2.1 I2V: (B, N, D), the CLIP vision encoder's second-to-last hidden state of the frame."""
LATENT_KEY = "first_frame_latent"
"""TI2V 5B: (B, 48, 1, h, w), the normalised latent of the first frame alone."""
MASK_CHANNELS = 4
"""The mask channels of 2.1 / 2.2 I2V: the VAE's temporal factor (4 pixel frames per latent
frame after the first)."""
I2V_BOUNDARY = 0.9
"""WAN 2.2 I2V A14B's expert boundary when model_index.json gives none (T2V: 0.875)."""


def default_boundary(folder: Path, text_to_video: float) -> float:
    """The expert boundary of a WAN 2.2 A14B folder whose model_index.json gives none."""
    index = read_json(folder / "model_index.json") or {}
    if index.get("_class_name") == "WanImageToVideoPipeline":
        return I2V_BOUNDARY
    return text_to_video


@torch.no_grad()
def encode_first_frame(
    vae: Any,
    vae_config: dict[str, Any],
    image: Tensor,
    *,
    frames: int,
    alone: bool,
) -> Tensor:
    """(3, H, W) in [-1, 1] → the normalised latent (1, C, F', h, w) of the clip [image, then
    ``frames`` - 1 black frames], or (1, C, 1, h, w) of the image ``alone`` (TI2V), as the
    pipeline's ``prepare_latents``: the posterior's mode, ``(z - mean) * (1 / std)``."""
    param = next(vae.parameters())
    first = image.to(param.device, param.dtype)[None, :, None]  # (1, 3, 1, H, W)
    if not alone and frames > 1:
        black = first.new_zeros(1, 3, frames - 1, *first.shape[-2:])
        first = torch.cat([first, black], dim=2)  # (1, 3, F, H, W)
    latent = vae.encode(first).latent_dist.mode().float()
    channels = latent.shape[1]
    mean = torch.tensor(vae_config["latents_mean"]).view(1, channels, 1, 1, 1)
    inverse_std = 1.0 / torch.tensor(vae_config["latents_std"]).view(1, channels, 1, 1, 1)
    return (latent - mean.to(latent.device)) * inverse_std.to(latent.device)


@torch.no_grad()
def encode_image(encoder: Any, processor: Any, image: Tensor) -> Tensor:
    """(3, H, W) in [-1, 1] → the CLIP vision encoder's ``hidden_states[-2]`` (1, N, D), as
    the 2.1 pipeline's ``encode_image``: the frame as an 8-bit picture through the folder's
    image processor (resize, crop, normalise)."""
    array = ((image.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0)
    picture = Image.fromarray(array.cpu().numpy())
    param = next(encoder.parameters())
    pixels = processor(images=picture, return_tensors="pt")["pixel_values"]
    hidden = encoder(pixel_values=pixels.to(param.device, param.dtype), output_hidden_states=True)
    return hidden.hidden_states[-2].float()


def conditioned(encodings: TextEncoding) -> bool:
    """Whether ``encodings`` hold a first frame's (the denoiser needs it to run)."""
    return VIDEO_KEY in encodings or LATENT_KEY in encodings


def denoiser_inputs(
    noisy: Tensor, timestep: Tensor, condition: TextEncoding, patch: int
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """The transformer's ``hidden_states``, ``timestep`` and extra arguments for ``noisy``
    (B, C, F', h, w) at ``timestep`` (B,) (the transformer's 0-1000 scale), with the first
    frame's encodings in ``condition`` (none: text-to-video, unchanged)."""
    extra: dict[str, Tensor] = {}
    if IMAGE_KEY in condition:
        extra["encoder_hidden_states_image"] = condition[IMAGE_KEY]
    if VIDEO_KEY in condition:
        video = condition[VIDEO_KEY].to(noisy.device, noisy.dtype)  # (B, 16, F', h, w)
        mask = torch.zeros_like(video[:, :MASK_CHANNELS])  # (B, 4, F', h, w)
        mask[:, :, 0] = 1.0  # latent frame 0 is given
        return torch.cat([noisy, mask, video], dim=1), timestep, extra  # (B, 36, F', h, w)
    if LATENT_KEY in condition:
        first = condition[LATENT_KEY].to(noisy.device, noisy.dtype)  # (B, C, 1, h, w)
        hidden = torch.cat([first, noisy[:, :, 1:]], dim=2)  # clean frame 0, noisy after
        batch, _, frames, height, width = noisy.shape
        per_frame = (height // patch) * (width // patch)  # tokens of one latent frame
        tokens = timestep.reshape(batch, 1).expand(batch, frames * per_frame).clone()
        tokens[:, :per_frame] = 0  # (B, F' * h/2 * w/2): frame 0's tokens are clean
        return hidden, tokens, extra
    return noisy, timestep, extra


def with_first_frame(latents: Tensor, condition: TextEncoding | None) -> Tensor:
    """TI2V: ``latents`` with the clean first frame in latent frame 0 (a sample's end, as the
    pipeline's); unchanged for the other forms."""
    if condition is None or LATENT_KEY not in condition:
        return latents
    first = condition[LATENT_KEY].to(latents.device, latents.dtype)
    return torch.cat([first, latents[:, :, 1:]], dim=2)


def predicted_frames(frames: int) -> Tensor:
    """(F',) float32: 1 on the latent frames TI2V image-to-video predicts, 0 on frame 0 (the
    given clean frame), which carries no loss and no mask weight."""
    weights = torch.ones(frames)
    weights[0] = 0.0
    return weights
