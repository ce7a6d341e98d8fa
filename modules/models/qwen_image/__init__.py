"""The ``qwen_image`` family's declaration: Qwen-Image text-to-image, Qwen-Image-Edit and
Qwen-Image-Edit 2509 / 2511 (no torch).

The code is in :mod:`modules.models.qwen_image.family` (the edit forms' in
:mod:`modules.models.qwen_image.edit`), imported only when the family is used.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field

from modules.models.spec import (
    FILE_FIELD,
    ConditioningKind,
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
    reference_pixels: int = Field(
        1024 * 1024,
        ge=64 * 64,
        le=2048 * 2048,
        title="Reference size (pixels)",
        description=(
            "Edit models: the area each reference image is VAE-encoded at, its aspect ratio "
            "kept (the pipelines use 1048576, about 1024 x 1024, whatever the output size). "
            "Smaller trains faster in less memory, but the LoRA then learns references at a "
            "size the pipeline does not give it."
        ),
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


EDIT_FORMS = {
    "QwenImageEditPipeline": ("Qwen-Image-Edit", 1),
    "QwenImageEditPlusPipeline": ("Qwen-Image-Edit-2509 / 2511 (Edit Plus)", 3),
}
"""An edit folder's pipeline class → its model in words and the references it takes."""
_EDIT_PARTS = {
    "transformer": ("QwenImageTransformer2DModel",),
    "vae": ("AutoencoderKLQwenImage",),
    "text_encoder": ("Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl"),
}


def _edit_pipeline(folder: Path) -> str | None:
    index = read_json(folder / "model_index.json") or {}
    named = index.get("_class_name")
    return named if named in EDIT_FORMS else None


def _conditioning(folder: Path, options: Any) -> tuple[ConditioningKind, ...]:
    """An edit folder's references: read with the caption by the VL encoder."""
    pipeline = _edit_pipeline(folder)
    if pipeline is None:
        return ()
    most = EDIT_FORMS[pipeline][1]
    return (ConditioningKind(name="reference", source="references", most=most, with_caption=True),)


def _summary(folder: Path, options: Any) -> str | None:
    pipeline = _edit_pipeline(folder)
    if pipeline is None:
        return None
    title, most = EDIT_FORMS[pipeline]
    transformer = read_json(folder / "transformer" / "config.json") or {}
    if pipeline == "QwenImageEditPlusPipeline":
        title = "Qwen-Image-Edit-2511" if transformer.get("zero_cond_t") else "Qwen-Image-Edit-2509"
    takes = "one reference image" if most == 1 else f"1 to {most} reference images"
    return f"Detected: {title}; trains edits with {takes} per target"


def _folder_problem(folder: Path, index: Mapping[str, Any], options: Any) -> str | None:
    """An edit folder needs its processor (the VL encoder's image processor)."""
    if _edit_pipeline(folder) and not (folder / "processor").is_dir():
        return (
            f"model.path: {folder} is a Qwen-Image-Edit model and has no processor/ subfolder "
            "(the image processor its text encoder reads the references with): complete the "
            "download of the model"
        )
    return None


SPEC = FamilySpec(
    name="qwen_image",
    title=(
        "Qwen-Image text-to-image, Qwen-Image-Edit and Edit 2509 / 2511 (Qwen2.5-VL text "
        "encoder, 2x2 packed tokens)"
    ),
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
        *(
            FolderKind(title=title, pipeline=pipeline, parts=_EDIT_PARTS)
            for pipeline, (title, _) in EDIT_FORMS.items()
        ),
    ),
    parts=("transformer", "vae", "text_encoder", "tokenizer", "scheduler"),
    example="a download of Qwen/Qwen-Image or Qwen/Qwen-Image-Edit-2509",
    folder_check=_folder_problem,
    conditioning_from_folder=_conditioning,
    folder_summary=_summary,
)
