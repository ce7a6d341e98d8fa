"""The ``zimage`` family's declaration: Z-Image base and Z-Image Turbo (no torch).

The code is in :mod:`modules.models.zimage.family`, imported only when the family is used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

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

_ATTENTION = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")
LORA_TARGETS = {
    # Every block's self-attention (the single stream: image and prompt tokens together, and the
    # refiner blocks that prepare each).
    "attention": _ATTENTION,
    # Also the SwiGLU MLPs (w1 and w3 in, w2 out).
    "attention_ffn": (*_ATTENTION, "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"),
}

TURBO_STEPS = 9
"""Z-Image Turbo's own sampler: 9 steps (8 transformer calls that move the image, as the model
card's ``num_inference_steps=9``) without classifier-free guidance."""


class ZImageOptions(FamilyOptions):
    """``model.zimage``."""

    variant: Literal["auto", "base", "turbo"] = Field(
        "auto",
        title="Variant",
        description=(
            "Z-Image base or the step-distilled Z-Image Turbo. auto: Turbo when the model "
            "folder's name says so (e.g. Z-Image-Turbo), base otherwise; the two folders have "
            "the same parts and configs."
        ),
    )
    training_adapter: str = Field(
        "",
        title="Training adapter (Turbo)",
        json_schema_extra=FILE_FIELD,
        description=(
            "Optional de-distillation LoRA (.safetensors, e.g. the published Z-Image Turbo "
            "training adapter) merged into Turbo's weights for training and for the teacher, "
            "and left out of the saved LoRA, so the LoRA learns the subject instead of undoing "
            "Turbo's distillation. Its keys: diffusion_model.<module>.lora_A/B.weight or the "
            "diffusers layout."
        ),
    )
    text_tokens: int = Field(
        512,
        ge=16,
        le=1024,
        title="Prompt tokens",
        description=(
            "The most tokens of a prompt, chat template included, the text encoder reads (the "
            "pipeline's max_sequence_length, 512); longer captions are cut there."
        ),
    )
    sample_steps: int | None = Field(
        None,
        ge=1,
        le=200,
        title="Sample steps",
        description=(
            f"Steps of the training samples. Empty: {TURBO_STEPS} for Turbo (its own count; "
            "sampling.steps is not used), sampling.steps for base."
        ),
    )
    sample_guidance: float | None = Field(
        None,
        ge=0.0,
        le=20.0,
        title="Sample guidance",
        description=(
            "Classifier-free guidance of the training samples (the pipeline's guidance_scale, "
            "with the negative prompt below; 0 turns it off). Empty: 0 for Turbo, 5 for base."
        ),
    )
    negative_prompt: str = Field(
        "",
        title="Sample negative prompt",
        description="The negative prompt of guided samples (empty: the pipeline's own).",
    )
    transformer_file: str = Field(
        "",
        title="Transformer file",
        json_schema_extra=FILE_FIELD,
        description=(
            "Optional single .safetensors transformer (the original or ComfyUI layout, e.g. "
            "z_image_turbo_bf16.safetensors, plain or scaled fp8, or diffusers names) used "
            "instead of the folder's; the folder still gives its config, the VAE and the text "
            "encoder."
        ),
    )


def is_turbo(folder: Path, options: Any = None) -> bool:
    """Whether the model at ``folder`` is Z-Image Turbo: ``model.zimage.variant``, or with
    ``auto`` the folder's name (its model_index.json's ``_name_or_path`` too, when present)."""
    variant = getattr(options, "variant", "auto")
    if variant != "auto":
        return variant == "turbo"
    index = read_json(folder / "model_index.json") or {}
    names = (folder.expanduser().absolute().name, str(index.get("_name_or_path", "")))
    return any("turbo" in name.lower() for name in names)


def _grid(folder: Path) -> LatentGrid | None:
    """The VAE's factor (8) times the transformer's 2x2 patches."""
    vae = read_json(folder / "vae" / "config.json")
    if vae is None:
        return None
    scale = 2 ** (len(vae.get("block_out_channels") or [0, 0, 0, 0]) - 1)
    return LatentGrid(pixels_per_cell=scale, pixel_multiple=2 * scale)


def _folder_check(folder: Path, index: Any, options: Any) -> str | None:
    if getattr(options, "training_adapter", "") and not is_turbo(folder, options):
        return (
            f"model.zimage.training_adapter is for Z-Image Turbo, and {folder} reads as Z-Image "
            "base: leave the adapter empty for base, or set model.zimage.variant=turbo if the "
            "folder is Turbo"
        )
    return None


def _summary(folder: Path, options: Any) -> str | None:
    if not is_turbo(folder, options):
        return "Z-Image base: trains and samples as the model is (CFG, sampling.steps)"
    if getattr(options, "training_adapter", ""):
        return (
            "Z-Image Turbo (step-distilled) with a training adapter merged for training; "
            f"samples at Turbo's {TURBO_STEPS} steps without the adapter"
        )
    return (
        "Z-Image Turbo (step-distilled): a plain LoRA de-distils it; set a training adapter "
        "(model.zimage.training_adapter) to keep Turbo's few-step sampling"
    )


SPEC = FamilySpec(
    name="zimage",
    title="Z-Image base and Turbo text-to-image (Qwen3 text encoder, single-stream DiT)",
    implementation="modules.models.zimage.family:ZImageFamily",
    single_file=SingleFileLayout(
        # Z-Image's modulated blocks have adaLN_modulation.0 (a bare Linear) in every layout;
        # Lumina-Image 2.0, the same design, has adaLN_modulation.1 (after a SiLU).
        markers=(r"^layers\.\d+\.adaLN_modulation\.0\.",),
        blocks={
            "n_layers": r"^layers\.(\d+)\.",
            "n_refiner_layers": r"^noise_refiner\.(\d+)\.",
        },
    ),
    lora_targets=LORA_TARGETS,
    grid=LatentGrid(pixels_per_cell=8, pixel_multiple=16),
    options=ZImageOptions,
    grid_from_folder=_grid,
    label="Z-Image",
    folders=(
        FolderKind(
            title="Z-Image",
            pipeline="ZImagePipeline",
            parts={
                "transformer": ("ZImageTransformer2DModel",),
                "vae": ("AutoencoderKL",),
                "text_encoder": ("Qwen3Model", "Qwen3ForCausalLM", "qwen3"),
            },
        ),
    ),
    parts=("transformer", "vae", "text_encoder", "tokenizer", "scheduler"),
    example="a download of Tongyi-MAI/Z-Image-Turbo or Tongyi-MAI/Z-Image",
    not_trained={
        "ZImageOmniPipeline": "a Z-Image Omni folder, an image-conditioned model",
    },
    folder_check=_folder_check,
    folder_summary=_summary,
)
