"""Tiny random WAN models and video datasets, built in code and saved in the real on-disk layouts.

The models are real diffusers / transformers classes with small dimensions, written by
``WanPipeline(...).save_pretrained`` so that the family loads them through the same code as a
downloaded ``Wan-AI/...-Diffusers`` folder. The tokenizer is a real ``T5Tokenizer`` (the class
WAN's UMT5 tokenizer uses) over a small unigram vocabulary built here, so no download is needed.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLWan,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from PIL import Image
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    T5Tokenizer,
    UMT5Config,
    UMT5EncoderModel,
)

from tests.data.video_files import moving_square, write_frames, write_video

TEXT_DIM = 32
WORDS = (
    *("a", "an", "the", "photo", "video", "of", "sks", "star", "square", "red", "blue"),
    *("green", "yellow", "magenta", "cat", "dog", "on", "in", "with", "striped", "checkered"),
    *("background", "moving", "walking", "slowly", "fast", "clip", "frame"),
)

TRANSFORMER = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": TEXT_DIM,
    "freq_dim": 32,
    "ffn_dim": 32,
    "num_layers": 2,
    "rope_max_seq_len": 32,
}
VAE = {
    "base_dim": 3,
    "z_dim": 16,
    "dim_mult": [1, 1, 1, 1],
    "num_res_blocks": 1,
    "temperal_downsample": [False, True, True],
}
# WAN 2.2 TI2V 5B's VAE: 48 latent channels, 2×2 pixel patches, 16× spatial compression.
TI2V_VAE = {
    **VAE,
    "z_dim": 48,
    "in_channels": 12,
    "out_channels": 12,
    "is_residual": True,
    "patch_size": 2,
    "scale_factor_spatial": 16,
    "latents_mean": [0.1] * 48,
    "latents_std": [2.0] * 48,
}


def build_tokenizer() -> T5Tokenizer:
    """A T5Tokenizer (unigram, T5's special tokens) whose vocabulary is WORDS plus characters."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{word}", -1.0) for word in WORDS]
    pieces += [(char, -5.0) for char in string.ascii_lowercase + string.digits + ",.'-"]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def build_tiny_wan(folder: Path, *, a14b: bool = False, ti2v: bool = False, seed: int = 0) -> Path:
    """Save a tiny WAN pipeline: 2.1 T2V layout, 2.2 A14B (two experts) or 2.2 TI2V 5B."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=TEXT_DIM,
            d_kv=8,
            d_ff=32,
            num_layers=2,
            num_heads=2,
            relative_attention_num_buckets=8,
        )
    ).eval()
    channels = 48 if ti2v else 16
    transformer = WanTransformer3DModel(
        **{**TRANSFORMER, "in_channels": channels, "out_channels": channels}
    )
    transformer_2 = WanTransformer3DModel(**TRANSFORMER) if a14b else None
    vae = AutoencoderKLWan(**(TI2V_VAE if ti2v else VAE))
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    pipeline = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=scheduler,
        transformer=transformer,
        transformer_2=transformer_2,
        boundary_ratio=0.875 if a14b else None,
        expand_timesteps=ti2v,
    )
    pipeline.save_pretrained(folder)
    return folder


CLIP_SIDE = 28
"""The tiny CLIP vision encoder's input side: 2 x 2 patches of 14 px (the real one: 224 / 14)."""
CLIP = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,  # the pipeline reads hidden_states[-2]
    "num_attention_heads": 2,
    "image_size": CLIP_SIDE,
    "patch_size": 14,
    "projection_dim": 16,
}
INNER = TRANSFORMER["num_attention_heads"] * TRANSFORMER["attention_head_dim"]


def build_tiny_wan_i2v(folder: Path, *, version: str = "2.1", seed: int = 0) -> Path:
    """Save a tiny WAN image-to-video pipeline (``WanImageToVideoPipeline``): ``"2.1"`` with a
    CLIP vision encoder and image cross-attention, or ``"2.2"`` (A14B: two experts, no image
    encoder, no boundary_ratio in model_index.json when ``version="2.2-no-boundary"``)."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=TEXT_DIM,
            d_kv=8,
            d_ff=32,
            num_layers=2,
            num_heads=2,
            relative_attention_num_buckets=8,
        )
    ).eval()
    # 16 noise + 4 mask + 16 first-frame latent channels in, 16 out.
    config = {**TRANSFORMER, "in_channels": 36, "out_channels": 16}
    image_encoder = image_processor = transformer_2 = None
    if version == "2.1":
        config.update(image_dim=CLIP["hidden_size"], added_kv_proj_dim=INNER)
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP)).eval()
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": CLIP_SIDE}, crop_size={"height": CLIP_SIDE, "width": CLIP_SIDE}
        )
    transformer = WanTransformer3DModel(**config)
    if version.startswith("2.2"):
        transformer_2 = WanTransformer3DModel(**config)
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    pipeline = WanImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=AutoencoderKLWan(**VAE),
        scheduler=scheduler,
        image_processor=image_processor,
        image_encoder=image_encoder,
        transformer=transformer,
        transformer_2=transformer_2,
        boundary_ratio=0.9 if version == "2.2" else None,
    )
    pipeline.save_pretrained(folder)
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    if index.get("image_processor", [None, None])[1] == "CLIPImageProcessorPil":
        # Without torchvision transformers names its PIL class; the real folders the other.
        index["image_processor"][1] = "CLIPImageProcessor"
    index_file.write_text(json.dumps(index, indent=2))
    return folder


def original_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers WAN transformer state dict in the original WAN (single-file) key layout."""
    renames = (
        ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
        ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
        ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
        ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
        ("condition_embedder.time_proj", "time_projection.1"),
        ("attn1", "self_attn"),
        ("attn2", "cross_attn"),
        (".to_out.0.", ".o."),
        (".to_q.", ".q."),
        (".to_k.", ".k."),
        (".to_v.", ".v."),
        ("ffn.net.0.proj", "ffn.0"),
        ("ffn.net.2", "ffn.2"),
        ("proj_out", "head.head"),
        (".norm2.", ".norm3."),  # diffusers' cross-attention norm is the original norm3
    )
    converted = {}
    for key, value in state.items():
        name = key
        for old, new in renames:
            name = name.replace(old, new)
        if name == "scale_shift_table":
            name = "head.modulation"
        name = name.replace("scale_shift_table", "modulation")
        converted[f"model.diffusion_model.{name}"] = value.contiguous()
    return converted


# ----------------------------------------------------------------------------------- datasets


def write_video_concept(
    folder: Path, frames: int = 12, size: int = 48, *, still: bool = True
) -> Path:
    """A concept of three clips, one per kind of mask, and one still image:

    - ``walk.mp4`` with a mask video ``walk-masklabel.mp4``;
    - ``spin/`` (a folder of frames) with mask frames in ``spin-masklabel/``;
    - ``pan.mp4`` with one still mask ``pan-masklabel.png`` for every frame;
    - ``still.png`` with ``still-masklabel.png`` (trains as a 1-frame video), unless
      ``still=False`` (an image-to-video concept: clips only).
    """
    folder.mkdir(parents=True, exist_ok=True)
    video, masks = moving_square(frames, size, seed=1)
    write_video(folder / "walk.mp4", video)
    write_video(folder / "walk-masklabel.mp4", masks)
    video, masks = moving_square(frames, size, seed=2)
    write_frames(folder / "spin", video)
    write_frames(folder / "spin-masklabel", masks)
    video, masks = moving_square(frames, size, seed=3)
    write_video(folder / "pan.mp4", video)
    Image.fromarray(masks[0]).save(folder / "pan-masklabel.png")
    if still:
        Image.fromarray(video[0]).save(folder / "still.png")
        Image.fromarray(masks[0]).save(folder / "still-masklabel.png")
    for name, caption in (
        ("walk", "a video of sks heart walking"),
        ("spin", "a video of sks heart on stripes"),
        ("pan", "sks heart moving slowly"),
        ("still", "a photo of sks heart"),
    )[: 4 if still else 3]:
        (folder / f"{name}.txt").write_text(caption, encoding="utf-8")
    return folder
