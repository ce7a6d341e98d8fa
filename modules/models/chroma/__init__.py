"""The ``chroma`` family's declaration: Chroma text-to-image (no torch).

The code is in :mod:`modules.models.chroma.family`, imported only when the family is used.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from modules.models.flux1 import FLUX_BLOCKS
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
    # proj_out in the single-stream blocks. (Chroma has no per-block modulation layers: its
    # approximator, distilled_guidance_layer, makes them all and is not trained.)
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


class ChromaOptions(FamilyOptions):
    """``model.chroma``."""

    text_tokens: int = Field(
        512,
        ge=16,
        le=512,
        title="T5 tokens",
        description=(
            "Prompt length the T5 encoder is padded to (the pipeline's max_sequence_length, "
            "512); longer captions are cut there. The transformer reads only the prompt's "
            "tokens and one padding token, whatever this length."
        ),
    )
    sample_cfg: float = Field(
        5.0,
        ge=1.0,
        le=20.0,
        title="Sample CFG scale",
        description=(
            "Classifier-free guidance of the training samples (the pipeline's guidance_scale, "
            "5 by default), with the negative prompt below; 1 turns it off (one pass per step)."
        ),
    )
    negative_prompt: str = Field(
        "",
        title="Sample negative prompt",
        description="The negative prompt of the samples' guidance (empty: the pipeline's).",
    )
    transformer_file: str = Field(
        "",
        title="Transformer file",
        json_schema_extra=FILE_FIELD,
        description=(
            "Optional single .safetensors transformer (Chroma's own release files such as "
            "Chroma1-HD.safetensors, ComfyUI's, including its scaled fp8 ones, or diffusers "
            "names) used instead of the folder's; the folder still gives its config, the VAE "
            "and T5."
        ),
    )


def _grid(folder: Path) -> LatentGrid | None:
    vae = read_json(folder / "vae" / "config.json")
    if vae is None:
        return None
    scale = 2 ** (len(vae.get("block_out_channels") or [0, 0, 0, 0]) - 1)
    return LatentGrid(pixels_per_cell=scale, pixel_multiple=2 * scale)


SPEC = FamilySpec(
    name="chroma",
    title="Chroma text-to-image (FLUX.1-derived, T5 only, 2x2 packed tokens)",
    implementation="modules.models.chroma.family:ChromaFamily",
    single_file=SingleFileLayout(
        # The approximator (distilled_guidance_layer) has the same name in Chroma's own files,
        # ComfyUI's and diffusers'; FLUX.1 has none. Chroma Radiance (pixel space) is another
        # model.
        markers=(r"^distilled_guidance_layer\.",),
        excludes=(r"^nerf_",),
        width=("img_in.weight", "x_embedder.weight"),
        blocks=FLUX_BLOCKS,
    ),
    lora_targets=LORA_TARGETS,
    grid=LatentGrid(pixels_per_cell=8, pixel_multiple=16),
    options=ChromaOptions,
    grid_from_folder=_grid,
    label="Chroma",
    folders=(
        FolderKind(
            title="Chroma",
            pipeline="ChromaPipeline",
            parts={
                "transformer": ("ChromaTransformer2DModel",),
                "vae": ("AutoencoderKL",),
                "text_encoder": ("T5EncoderModel", "t5"),
            },
        ),
    ),
    parts=("transformer", "vae", "text_encoder", "tokenizer", "scheduler"),
    example="a download of lodestones/Chroma1-HD",
)
