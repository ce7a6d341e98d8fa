"""The ``flux1`` family's declaration: FLUX.1 dev, schnell and Kontext (no torch).

The code is in :mod:`modules.models.flux1.family`, imported only when the family is used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

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

_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj")
LORA_TARGETS = {
    # The double-stream blocks' image and text attention; the single-stream blocks' q, k, v.
    "attention": (*_ATTENTION, "to_add_out"),
    # Also the MLPs: ff / ff_context in the double-stream blocks, proj_mlp and the fused output
    # proj_out in the single-stream blocks.
    "attention_ffn": (
        *_ATTENTION,
        "to_add_out",
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
        "proj_mlp",
        "proj_out",
    ),
}


class Flux1Options(FamilyOptions):
    """``model.flux1``."""

    guidance: float = Field(
        1.0,
        ge=0.0,
        le=20.0,
        title="Training guidance (dev)",
        description=(
            "The guidance value FLUX.1 dev's guidance embedding gets during training (and for "
            "the teacher); 1.0 is the usual choice. schnell has no guidance embedding."
        ),
    )
    sample_guidance: float = Field(
        3.5,
        ge=0.0,
        le=20.0,
        title="Sample guidance (dev)",
        description="The embedded guidance of the training samples (the pipeline's default).",
    )
    text_tokens: int | None = Field(
        None,
        ge=16,
        le=512,
        title="T5 tokens",
        description=(
            "Prompt length the T5 encoder is padded to. Empty: 512 for dev, 256 for schnell "
            "(the lengths they were trained with)."
        ),
    )
    transformer_file: str = Field(
        "",
        title="Transformer file",
        json_schema_extra=FILE_FIELD,
        description=(
            "Optional single-file transformer (the original BFL .safetensors, e.g. "
            "flux1-dev.safetensors) used instead of the folder's; the folder still gives its "
            "config, the VAE and both text encoders."
        ),
    )
    reference_size: Literal["preferred", "own"] = Field(
        "preferred",
        title="Reference size (Kontext)",
        description=(
            "How FLUX.1 Kontext's reference images are resized before encoding. preferred: to "
            "the Kontext resolution nearest the reference's aspect ratio (about 1 megapixel), "
            "as FluxKontextPipeline does by default; own: kept at their own size (over 1 "
            "megapixel scaled down to it), as the pipeline with _auto_resize=False, fewer "
            "tokens for small training images. Both are floored to a multiple of 16 pixels."
        ),
    )


KONTEXT_PIPELINE = "FluxKontextPipeline"
REFERENCE = ConditioningKind(name="reference", source="references", most=1)
"""A Kontext item's conditioning: its one reference image, at its own size."""


def is_kontext(folder: Path) -> bool:
    """Whether ``folder`` is a FLUX.1 Kontext folder (its ``model_index.json`` says so)."""
    index = read_json(folder / "model_index.json") or {}
    return index.get("_class_name") == KONTEXT_PIPELINE


def _conditioning(folder: Path, options: Any) -> tuple[ConditioningKind, ...]:
    return (REFERENCE,) if is_kontext(folder) else ()


def _summary(folder: Path, options: Any) -> str | None:
    """What a run trains on the folder, for the Model tab."""
    if not is_kontext(folder):
        return None
    size = getattr(options, "reference_size", "preferred")
    return (
        "Detected: FLUX.1 Kontext (image editing); trains on pairs, one reference image per "
        f"target (model.flux1.reference_size={size})"
    )


def _grid(folder: Path) -> LatentGrid | None:
    vae = read_json(folder / "vae" / "config.json")
    if vae is None:
        return None
    scale = 2 ** (len(vae.get("block_out_channels") or [0, 0, 0, 0]) - 1)
    return LatentGrid(pixels_per_cell=scale, pixel_multiple=2 * scale)


FLUX_BLOCKS = {
    "num_layers": r"^(?:double_blocks|transformer_blocks)\.(\d+)\.",
    "num_single_layers": r"^(?:single_blocks|single_transformer_blocks)\.(\d+)\.",
}
"""A FLUX-shaped single file's block counts by config field, in BFL's and diffusers' names
(FLUX.1, FLUX.2 and Chroma alike)."""


SPEC = FamilySpec(
    name="flux1",
    title=(
        "FLUX.1 dev and schnell text-to-image, Kontext image editing (CLIP + T5, 2x2 packed tokens)"
    ),
    implementation="modules.models.flux1.family:Flux1Family",
    single_file=SingleFileLayout(
        # BFL's files have double_blocks, diffusers' single_transformer_blocks; FLUX.2's have
        # both too, with modulation layers of their own.
        markers=(r"^double_blocks\.\d+\.", r"^single_transformer_blocks\.\d+\."),
        # FLUX.2's modulation; Chroma's guidance approximator (Chroma is FLUX.1-shaped).
        excludes=(r"^double_stream_modulation_img\.", r"^distilled_guidance_layer\."),
        width=("img_in.weight", "x_embedder.weight"),
        blocks=FLUX_BLOCKS,
    ),
    lora_targets=LORA_TARGETS,
    grid=LatentGrid(pixels_per_cell=8, pixel_multiple=16),
    options=Flux1Options,
    grid_from_folder=_grid,
    label="FLUX.1",
    folders=(
        FolderKind(
            title="FLUX.1",
            pipeline="FluxPipeline",
            parts={
                "transformer": ("FluxTransformer2DModel",),
                "vae": ("AutoencoderKL",),
                "text_encoder": ("CLIPTextModel", "clip_text_model"),
                "text_encoder_2": ("T5EncoderModel", "t5"),
            },
        ),
        FolderKind(
            title="FLUX.1 Kontext",
            pipeline=KONTEXT_PIPELINE,
            parts={
                "transformer": ("FluxTransformer2DModel",),
                "vae": ("AutoencoderKL",),
                "text_encoder": ("CLIPTextModel", "clip_text_model"),
                "text_encoder_2": ("T5EncoderModel", "t5"),
            },
        ),
    ),
    parts=(
        *("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
        "scheduler",
    ),
    example="a download of black-forest-labs/FLUX.1-dev",
    not_trained={
        # Same parts as dev, but trained to take an input image (fill, control, editing).
        "FluxFillPipeline": "a FLUX.1 Fill folder, an inpainting model",
        "FluxControlPipeline": "a FLUX.1 Canny or Depth folder, a control model",
    },
    conditioning_from_folder=_conditioning,
    folder_summary=_summary,
)
