"""The ``flux1`` family's declaration: FLUX.1 dev and schnell (no torch).

The code is in :mod:`modules.models.flux1.family`, imported only when the family is used.
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


def _grid(folder: Path) -> LatentGrid | None:
    vae = read_json(folder / "vae" / "config.json")
    if vae is None:
        return None
    scale = 2 ** (len(vae.get("block_out_channels") or [0, 0, 0, 0]) - 1)
    return LatentGrid(pixels_per_cell=scale, pixel_multiple=2 * scale)


SPEC = FamilySpec(
    name="flux1",
    title="FLUX.1 dev and schnell text-to-image (CLIP + T5, 2x2 packed tokens)",
    implementation="modules.models.flux1.family:Flux1Family",
    single_file=SingleFileLayout(
        # BFL's files have double_blocks, diffusers' single_transformer_blocks; FLUX.2's have
        # both too, with modulation layers of their own.
        markers=(r"^double_blocks\.\d+\.", r"^single_transformer_blocks\.\d+\."),
        excludes=(r"^double_stream_modulation_img\.",),
        width=("img_in.weight", "x_embedder.weight"),
        blocks={
            "num_layers": r"^(?:double_blocks|transformer_blocks)\.(\d+)\.",
            "num_single_layers": r"^(?:single_blocks|single_transformer_blocks)\.(\d+)\.",
        },
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
        "FluxKontextPipeline": "a FLUX.1 Kontext folder, an image-editing model",
    },
)
