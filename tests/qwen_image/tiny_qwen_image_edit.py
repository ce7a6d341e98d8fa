"""A tiny random Qwen-Image-Edit-Plus (2509 / 2511) folder, built in code and saved in the layout
of a download of ``Qwen/Qwen-Image-Edit-2509``.

``build_tiny_qwen_image_edit(folder, zero_cond_t=True)`` writes the Qwen-Image parts of
:mod:`tests.qwen_image.tiny_qwen_image` (transformer, VAE, Qwen2.5-VL text encoder with its
vision tower, tokenizer, scheduler) plus ``processor/``: the Qwen2-VL image processor's
``preprocessor_config.json`` beside the tokenizer's files, as the real folder holds them.
``model_index.json`` names ``QwenImageEditPlusPipeline`` (``edit=True``: the one-reference
``QwenImageEditPipeline``) and its ``processor`` part.

What differs from the text-to-image folder, because the edit pipelines depend on it:

- the tokenizer also makes every word of the edit template a token, so its system prefix is
  exactly 64 tokens, the pipelines' ``prompt_template_encode_start_idx`` (asserted here);
- the transformer has ``zero_cond_t`` (2511: the reference tokens get timestep 0; 2509: False);
- the VAE is narrower (``base_dim=4``): the pipelines VAE-encode every reference at about
  1024 x 1024 whatever the output size, and the VAE's mid-block attention over 128 x 128
  cells is most of a call's time.

``processor(folder)`` is the working load of ``processor/``: transformers' ``Qwen2VLProcessor``
type-checks a video processor, which needs torchvision; the pipelines never use it, so the
image processor and tokenizer are given without one (the family loads it the same way).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from modules.models.qwen_image.edit import EDIT_TEMPLATE, EDIT_TEMPLATE_TOKENS, load_processor
from modules.models.qwen_image.family import PROMPT_TEMPLATE
from tests.qwen_image.tiny_qwen_image import SCHEDULER, TEXT_ENCODER, TRANSFORMER, VAE
from tests.qwen_image.tiny_qwen_image import build_tokenizer as build_text_tokenizer

EDIT_VAE = {**VAE, "base_dim": 4}
# Qwen/Qwen-Image-Edit-2509 processor/preprocessor_config.json (the patch and merge sizes, the
# CLIP normalisation, the pixel range).
IMAGE_PROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2VLProcessor",
    "do_resize": True,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "do_convert_rgb": True,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "min_pixels": 3136,
    "max_pixels": 12845056,
}


def build_tokenizer():
    """The text-to-image tokenizer's BPE, trained on the edit template's words too."""
    tokenizer = build_text_tokenizer((PROMPT_TEMPLATE, EDIT_TEMPLATE))
    prefix = EDIT_TEMPLATE.split("{}")[0]
    count = len(tokenizer(prefix).input_ids)
    assert count == EDIT_TEMPLATE_TOKENS, f"the edit prefix is {count} tokens, not 64"
    return tokenizer


def build_tiny_qwen_image_edit(
    folder: Path, *, zero_cond_t: bool = True, edit: bool = False, seed: int = 0
) -> Path:
    """Save a tiny random Qwen-Image-Edit-Plus folder (2511 with ``zero_cond_t``, else 2509;
    ``edit``: Qwen-Image-Edit, one reference) to ``folder`` and return it."""
    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        **TEXT_ENCODER,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    config.text_config.vocab_size = len(tokenizer)
    config.text_config.bos_token_id = ids("<|endoftext|>")
    config.text_config.eos_token_id = ids("<|im_end|>")
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    transformer = QwenImageTransformer2DModel(**TRANSFORMER, zero_cond_t=zero_cond_t)
    pipeline = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        vae=AutoencoderKLQwenImage(**EDIT_VAE),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipeline.save_pretrained(folder)
    # processor/: the image processor's config and the tokenizer, as in the real download.
    processor = folder / "processor"
    tokenizer.save_pretrained(processor)
    (processor / "preprocessor_config.json").write_text(json.dumps(IMAGE_PROCESSOR, indent=2))
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    index["_class_name"] = "QwenImageEditPipeline" if edit else "QwenImageEditPlusPipeline"
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    index_file.write_text(json.dumps(index, indent=2))
    return folder


def edit_pipeline(folder: Path):
    """The folder's edit pipeline (``QwenImageEditPlusPipeline`` or ``QwenImageEditPipeline``
    as model_index.json names it), with the processor loaded without a video processor."""
    import diffusers

    name = json.loads((Path(folder) / "model_index.json").read_text())["_class_name"]
    pipeline = getattr(diffusers, name).from_pretrained(
        folder, processor=load_processor(Path(folder)), local_files_only=True
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
