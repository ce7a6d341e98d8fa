"""The ``qwen_image`` family's declaration: Qwen-Image text-to-image (no torch).

The code is in :mod:`modules.models.qwen_image.family`, imported only when the family is used.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from modules.models.spec import (
    FILE_FIELD,
    FamilyOptions,
    FamilySpec,
    FolderKind,
    LatentGrid,
    SingleFileLayout,
    read_json,
)

_ATTENTION = (
    # Each block's joint attention: the image stream's and the text stream's projections.
    *("to_q", "to_k", "to_v", "to_out.0"),
    *("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),
)
LORA_TARGETS = {
    "attention": _ATTENTION,
    # Also both streams' MLPs (GELU, 4x).
    "attention_ffn": (
        *_ATTENTION,
        *("img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"),
    ),
}


class QwenImageOptions(FamilyOptions):
    """``model.qwen_image``."""

    text_tokens: int = Field(
        512,
        ge=16,
        le=1024,
        title="Prompt tokens",
        description=(
            "The most prompt tokens the transformer reads (the pipeline's max_sequence_length, "
            "512 by default, 1024 at most); longer captions are cut there."
        ),
    )
    sample_cfg: float = Field(
        4.0,
        ge=1.0,
        le=20.0,
        title="Sample CFG scale",
        description=(
            "True classifier-free guidance of the training samples (the pipeline's "
            "true_cfg_scale), with the negative prompt below; 1 turns it off (one pass per step)."
        ),
    )
    negative_prompt: str = Field(
        " ",
        title="Sample negative prompt",
        description='The negative prompt of the samples\' guidance (" ": the usual empty one).',
    )
    transformer_file: str = Field(
        "",
        title="Transformer file",
        json_schema_extra=FILE_FIELD,
        description=(
            "Optional single .safetensors transformer (diffusers or ComfyUI key names, e.g. "
            "qwen_image_bf16.safetensors, or a fine-tune of the same architecture) used "
            "instead of the folder's; the folder still gives its config, the VAE and the text "
            "encoder."
        ),
    )


def _grid(folder: Path) -> LatentGrid | None:
    """The VAE's factor (2 per ``temperal_downsample`` entry: 8) times the 2x2 packing."""
    vae = read_json(folder / "vae" / "config.json")
    if vae is None:
        return None
    scale = 2 ** len(vae.get("temperal_downsample") or [0, 0, 0])
    return LatentGrid(pixels_per_cell=scale, pixel_multiple=2 * scale)


SPEC = FamilySpec(
    name="qwen_image",
    title="Qwen-Image text-to-image (Qwen2.5-VL text encoder, 2x2 packed tokens)",
    implementation="modules.models.qwen_image.family:QwenImageFamily",
    single_file=SingleFileLayout(
        markers=(r"^transformer_blocks\.\d+\.img_mod\.",),
        width=("img_in.weight",),
        blocks={"num_layers": r"^transformer_blocks\.(\d+)\."},
    ),
    lora_targets=LORA_TARGETS,
    grid=LatentGrid(pixels_per_cell=8, pixel_multiple=16),
    options=QwenImageOptions,
    grid_from_folder=_grid,
    label="Qwen-Image",
    folders=(
        FolderKind(
            title="Qwen-Image",
            pipeline="QwenImagePipeline",
            parts={
                "transformer": ("QwenImageTransformer2DModel",),
                "vae": ("AutoencoderKLQwenImage",),
                "text_encoder": ("Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl"),
            },
        ),
    ),
    parts=("transformer", "vae", "text_encoder", "tokenizer", "scheduler"),
    example="a download of Qwen/Qwen-Image",
    not_trained={
        "QwenImageEditPipeline": "a Qwen-Image-Edit folder, an image-editing model",
        "QwenImageEditPlusPipeline": "a Qwen-Image-Edit-2509 folder, an image-editing model",
    },
)
