"""The tiny Qwen-Image folder is a real QwenImagePipeline: it loads offline, generates square and
non-square images, and its tokenizer splits the prompt template's prefix into exactly the 34
tokens the pipeline drops."""

import numpy as np
import pytest
import torch
from diffusers import QwenImagePipeline

from tests.qwen_image.tiny_qwen_image import DROP_TOKENS, TEMPLATE_PREFIX, build_tiny_qwen_image


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    folder = build_tiny_qwen_image(tmp_path_factory.mktemp("qwen_image") / "tiny")
    pipe = QwenImagePipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(("height", "width"), [(64, 64), (48, 64)])
def test_generates_finite_images(pipeline, height, width):
    images = pipeline(
        "a photo of sks cat",
        height=height,
        width=width,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert images.shape == (1, height, width, 3)
    assert np.isfinite(images).all()


def test_true_cfg_runs(pipeline):
    images = pipeline(
        "a red star",
        negative_prompt=" ",
        true_cfg_scale=4.0,
        height=32,
        width=32,
        num_inference_steps=2,
        output_type="pt",
    ).images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_template_prefix_is_exactly_the_dropped_tokens(pipeline):
    assert pipeline.prompt_template_encode.startswith(TEMPLATE_PREFIX)
    assert pipeline.prompt_template_encode_start_idx == DROP_TOKENS
    tokenizer = pipeline.tokenizer
    assert len(tokenizer(TEMPLATE_PREFIX).input_ids) == DROP_TOKENS
    prompt = "a photo of sks cat"
    ids = tokenizer(pipeline.prompt_template_encode.format(prompt)).input_ids
    suffix = tokenizer("<|im_end|>\n<|im_start|>assistant\n").input_ids
    assert tokenizer.decode(ids[DROP_TOKENS : len(ids) - len(suffix)]) == prompt


def test_prompt_embeds_drop_the_template(pipeline):
    prompts = ["a cat", "a photo of a red star on stripes"]
    embeds, mask = pipeline.encode_prompt(prompts, device="cpu")
    # kept: prompt tokens + "<|im_end|>\n<|im_start|>assistant\n" (5 tokens); padded to the longest
    assert embeds.shape == (2, 8 + 5, 32) and mask.shape == (2, 8 + 5)
    assert mask.sum(dim=1).tolist() == [2 + 5, 8 + 5]
