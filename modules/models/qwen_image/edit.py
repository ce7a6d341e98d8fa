"""Qwen-Image-Edit and Edit Plus (2509 / 2511): an edit's reference images, encoded as
``QwenImageEditPipeline`` and ``QwenImageEditPlusPipeline`` encode them, and the denoiser inputs
made from them.

The forms (:func:`edit_form`, from ``model_index.json``'s ``_class_name``):

- ``edit``, Qwen-Image-Edit (``QwenImageEditPipeline``): one reference, resized to about
  1024 x 1024 pixels (its aspect ratio kept, sides multiples of 32); that picture is read by the
  Qwen2.5-VL encoder with the prompt (``<|vision_start|><|image_pad|><|vision_end|>`` before it)
  and VAE-encoded.
- ``edit_plus``, Qwen-Image-Edit-2509 / 2511 (``QwenImageEditPlusPipeline``): up to three
  references, each read by the VL encoder at about 384 x 384 (``Picture 1: ...`` before the
  prompt, one per reference) and VAE-encoded at about 1024 x 1024. 2511 is the folder whose
  transformer has ``zero_cond_t``: the reference tokens get timestep 0 (the transformer does it
  from ``img_shapes``).

For both, the prompt's hidden states drop the template's first 64 tokens (its system prefix);
the image tokens, the prompt and the template's end are kept, unpadded (the pipelines do not cut
them at ``max_sequence_length``). Each reference latent is normalised and packed into 2x2 tokens
like the target's; the denoiser reads the target's tokens followed by every reference's, with
``img_shapes`` listing the target's grid and then each reference's, and only the target's
tokens of its output are the prediction.

The encodings are named apart from the plain prompt's (``embeds``, ``mask``): the conditioning
slot caches them per item (keyed by the references and the caption) and hands them to
``predict`` merged with the prompt's, so the teacher gets exactly the student's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image
from torch import Tensor
from transformers import AutoTokenizer, Qwen2VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from modules.models.base import ModelLoadError, TextEncoding
from modules.models.packing import pack
from modules.models.spec import read_json

EditForm = Literal["edit", "edit_plus"]
PIPELINES: dict[str, EditForm] = {
    "QwenImageEditPipeline": "edit",
    "QwenImageEditPlusPipeline": "edit_plus",
}

EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, "
    "texture, objects, background), then explain how the user's text instruction should alter "
    "or modify the image. Generate a new image that meets the user's requirements while "
    "maintaining consistency with the original input where appropriate.<|im_end|>\n"
    "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
"""Both pipelines' template (Qwen-Image-Edit puts its one image's tokens before the prompt)."""
EDIT_TEMPLATE_TOKENS = 64
"""The template's system prefix, up to the user's text: the tokens the pipelines drop."""
VISION = "<|vision_start|><|image_pad|><|vision_end|>"
PICTURE = "Picture {}: " + VISION
"""Edit Plus: one per reference, numbered from 1, before the prompt."""
CONDITION_PIXELS = 384 * 384
"""Edit Plus: the area each reference is read at by the VL encoder."""
VAE_PIXELS = 1024 * 1024
"""The area the pipelines VAE-encode each reference at (and Qwen-Image-Edit reads it at)."""

EMBEDS_KEY = "edit_embeds"
"""(B, L, D): the edit prompt's last hidden states after the 64-token prefix."""
MASK_KEY = "edit_mask"
"""(B, L) long: 1 on real tokens (batches zero-pad shorter prompts)."""
TOKENS_KEY = "reference_tokens"
"""(B, N, 64): every reference's normalised latent packed in 2x2 tokens, one after another."""
SHAPES_KEY = "reference_shapes"
"""(B, K, 3) long: each reference's token grid (1, h/2, w/2), in order."""
KEYS = (EMBEDS_KEY, MASK_KEY, TOKENS_KEY, SHAPES_KEY)


def edit_form(folder: Path) -> EditForm | None:
    """The folder's edit form from ``model_index.json``; None: text-to-image (or unreadable)."""
    index = read_json(folder / "model_index.json") or {}
    return PIPELINES.get(str(index.get("_class_name", "")))


def most_references(form: EditForm) -> int:
    """The references the form's pipeline takes (Edit Plus is documented and trained with up to
    three; the pipeline itself would take more)."""
    return 1 if form == "edit" else 3


def zero_cond_t(folder: Path) -> bool:
    """Whether the folder's transformer gives the reference tokens timestep 0 (2511)."""
    return bool((read_json(folder / "transformer" / "config.json") or {}).get("zero_cond_t"))


def calculate_dimensions(area: int, ratio: float) -> tuple[int, int]:
    """(width, height) of about ``area`` pixels at ``ratio`` = W / H, multiples of 32 (the
    pipelines' ``calculate_dimensions``)."""
    width = math.sqrt(area * ratio)
    height = width / ratio
    return round(width / 32) * 32, round(height / 32) * 32


class _ImageOnlyProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without a video processor: transformers type-checks one (and its
    class needs torchvision), the edit pipelines never give it videos."""

    def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


def load_processor(folder: Path) -> Qwen2VLProcessor:
    """The folder's ``processor/``: its image processor (PIL backend) and tokenizer (the
    processor's own files, else ``tokenizer/``), without the video processor."""
    where = folder / "processor"
    try:
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(where, local_files_only=True)
        has_tokenizer = (where / "tokenizer_config.json").is_file()
        tokenizer = AutoTokenizer.from_pretrained(
            where if has_tokenizer else folder / "tokenizer", local_files_only=True
        )
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"model.path: cannot read the Qwen-Image-Edit processor in {where} ({error}); "
            "complete the download of the model (processor/ holds preprocessor_config.json and "
            "the tokenizer's files)"
        ) from None
    return _ImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer)


def to_picture(image: Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] → the 8-bit RGB picture it was loaded from."""
    array = ((image.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0)
    return Image.fromarray(np.ascontiguousarray(array.cpu().numpy()))


def _resizer(vae_config: dict[str, Any]) -> VaeImageProcessor:
    """The pipelines' ``image_processor`` (its resize filter and normalisation)."""
    scale = 2 ** len(vae_config.get("temperal_downsample") or [0, 0, 0])
    return VaeImageProcessor(vae_scale_factor=scale * 2)


@torch.no_grad()
def encode_edit_prompt(
    processor: Any,
    encoder: Any,
    caption: str,
    pictures: Sequence[Image.Image],
    form: EditForm,
    vae_config: dict[str, Any],
    *,
    vae_pixels: int = VAE_PIXELS,
) -> TextEncoding:
    """The caption read with the references as the form's pipeline reads them → ``{EMBEDS_KEY:
    (1, L, D) float32, MASK_KEY: (1, L)}``."""
    resizer = _resizer(vae_config)
    if form == "edit":
        width, height = calculate_dimensions(vae_pixels, _ratio(pictures[0]))
        seen = [resizer.resize(pictures[0], height, width)]
        text = EDIT_TEMPLATE.format(VISION + caption)
    else:
        seen = []
        for picture in pictures:
            width, height = calculate_dimensions(CONDITION_PIXELS, _ratio(picture))
            seen.append(resizer.resize(picture, height, width))
        numbered = "".join(PICTURE.format(index + 1) for index in range(len(pictures)))
        text = EDIT_TEMPLATE.format(numbered + caption)
    param = next(encoder.parameters())
    inputs = processor(text=[text], images=seen, padding=True, return_tensors="pt")
    hidden = encoder(
        input_ids=inputs["input_ids"].to(param.device),
        attention_mask=inputs["attention_mask"].to(param.device),
        pixel_values=inputs["pixel_values"].to(param.device, param.dtype),
        image_grid_thw=inputs["image_grid_thw"].to(param.device),
        output_hidden_states=True,
    ).hidden_states[-1]
    kept = hidden[0][inputs["attention_mask"][0].bool().to(hidden.device)][EDIT_TEMPLATE_TOKENS:]
    embeds = kept.unsqueeze(0).float().cpu()  # (1, L, D)
    return {EMBEDS_KEY: embeds, MASK_KEY: torch.ones(embeds.shape[:2], dtype=torch.long)}


@torch.no_grad()
def encode_references(
    vae: Any,
    vae_config: dict[str, Any],
    pictures: Sequence[Image.Image],
    *,
    vae_pixels: int = VAE_PIXELS,
) -> TextEncoding:
    """Each reference at about ``vae_pixels`` (the pipelines' 1024 x 1024), VAE-encoded (the
    posterior's mode), normalised and packed → ``{TOKENS_KEY: (1, N, 64) float32, SHAPES_KEY:
    (1, K, 3)}``."""
    resizer = _resizer(vae_config)
    param = next(vae.parameters())
    channels = int(vae_config.get("z_dim", 16))
    mean = torch.tensor(vae_config["latents_mean"]).view(1, channels, 1, 1)
    std = torch.tensor(vae_config["latents_std"]).view(1, channels, 1, 1)
    tokens, shapes = [], []
    for picture in pictures:
        width, height = calculate_dimensions(vae_pixels, _ratio(picture))
        pixels = resizer.preprocess(picture, height, width)  # (1, 3, H, W) in [-1, 1]
        frames = pixels.to(param.device, param.dtype).unsqueeze(2)  # one-frame video
        latent = vae.encode(frames).latent_dist.mode()[:, :, 0].float().cpu()  # (1, C, h, w)
        latent = (latent - mean) / std
        tokens.append(pack(latent))  # (1, h/2 * w/2, 4C)
        shapes.append((1, latent.shape[-2] // 2, latent.shape[-1] // 2))
    return {
        TOKENS_KEY: torch.cat(tokens, dim=1),
        SHAPES_KEY: torch.tensor([shapes], dtype=torch.long),
    }


def _ratio(picture: Image.Image) -> float:
    width, height = picture.size
    return width / height


def has_references(text: TextEncoding) -> bool:
    """Whether ``text`` holds an item's (or a sample's) encoded references."""
    return all(key in text for key in KEYS)


def row(text: TextEncoding, references: TextEncoding, index: int) -> TextEncoding:
    """Sample ``index``'s prompt encodings and its references (``references`` batch-first, as
    :meth:`encode_conditioning` rows stacked with zero padding), the padding cut off."""
    mask = references[MASK_KEY][index]
    length = int(mask.sum())
    shapes = references[SHAPES_KEY][index]  # (K, 3), zero rows after its references
    shapes = shapes[shapes[:, 0] > 0]
    count = int(shapes.prod(dim=1).sum())  # its reference tokens
    own = {key: value[index : index + 1] for key, value in text.items()}
    return {
        **own,
        EMBEDS_KEY: references[EMBEDS_KEY][index : index + 1, :length],
        MASK_KEY: mask[None, :length],
        TOKENS_KEY: references[TOKENS_KEY][index : index + 1, :count],
        SHAPES_KEY: shapes[None],
    }


def denoiser_inputs(
    tokens: Tensor, text: TextEncoding, height: int, width: int
) -> tuple[Tensor, Tensor, Tensor, list[list[tuple[int, int, int]]]]:
    """The target's packed ``tokens`` (B, h/2 * w/2, 64) of an (h, w) latent grid, and the
    references in ``text`` → the transformer's ``hidden_states`` (B, h/2 * w/2 + N, 64), the
    edit prompt's embeddings and mask, and ``img_shapes`` (the target's grid, then each
    reference's). A ValueError when the samples of a batch have references of different
    shapes (the transformer's rotary embedding takes one list for the batch)."""
    shapes = text[SHAPES_KEY]  # (B, K, 3), zero rows where a sample has fewer references
    if shapes.shape[0] > 1 and not bool((shapes == shapes[:1]).all()):
        raise ValueError(
            "training.batch_size: the items of a batch have references of different sizes or "
            "counts, and Qwen-Image-Edit takes one layout of references per batch; set "
            "training.batch_size=1 (training.gradient_accumulation for a larger effective batch)"
        )
    grids = [tuple(int(x) for x in row) for row in shapes[0].tolist() if row[0] > 0]
    device = tokens.device
    references = text[TOKENS_KEY].to(device, tokens.dtype)
    hidden = torch.cat([tokens, references], dim=1)  # (B, target + references, 64)
    img_shapes = [[(1, height // 2, width // 2), *grids]] * tokens.shape[0]
    return hidden, text[EMBEDS_KEY].to(device), text[MASK_KEY].to(device), img_shapes
