"""The ``wan`` family's declaration: its options, LoRA targets and latent grid (no torch).

The code is in :mod:`modules.models.wan.family`, imported only when the family is used.
"""

from __future__ import annotations

from collections.abc import Mapping
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

LORA_TARGETS = {
    # attn1 (self-attention) and attn2 (cross-attention) share these projection names.
    "attention": ("to_q", "to_k", "to_v", "to_out.0"),
    "attention_ffn": ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"),
}
"""The LoRA target presets of a WAN transformer (WAN, and the demo family's transformer)."""


class WanOptions(FamilyOptions):
    """``model.wan``."""

    flow_shift: float | None = Field(
        None,
        ge=1.0,
        le=20.0,
        title="Flow shift",
        description=(
            "Shift of the flow-matching timesteps, s t / (1 + (s - 1) t): above 1 trains more at "
            "high noise. Empty: WAN's default 3.0, suited to 480p (use 5.0 for 720p). Also used "
            "for the samples."
        ),
    )
    expert: Literal["auto", "high_noise", "low_noise", "both"] = Field(
        "auto",
        title="Expert (WAN 2.2 A14B)",
        description=(
            "WAN 2.2 A14B has two transformers: high_noise (transformer/) for timesteps at or "
            "above the boundary (boundary_ratio in model_index.json, 0.875 if absent) and "
            "low_noise (transformer_2/) below it. The LoRA trains the chosen one on its own "
            "timestep range, and the teacher is the same expert. auto: the only transformer of "
            "a one-transformer model (WAN 2.1, TI2V 5B)."
        ),
    )
    transformer_file: str = Field(
        "",
        title="Transformer file",
        json_schema_extra=FILE_FIELD,
        description=(
            "Optional single .safetensors transformer (original WAN or ComfyUI key layout) used "
            "instead of the folder's transformer (or the chosen expert's); the folder still "
            "gives its config, the VAE and the text encoder. bfloat16, float16, fp8 and "
            "ComfyUI's fp8_scaled files are read; a scaled file's layers stay in float8 with "
            "the file's scales (see model.memory.base_weights)."
        ),
    )


def _grid(folder: Path) -> LatentGrid | None:
    """The VAE's spatial factor (8; 16 for TI2V 5B) times the transformer's 2x2 patch."""
    vae = read_json(folder / "vae" / "config.json")
    if vae is None:
        return None
    scale = int(vae.get("scale_factor_spatial") or 8)
    transformer = read_json(folder / "transformer" / "config.json") or {}
    patch = (transformer.get("patch_size") or [1, 2, 2])[-1]
    return LatentGrid(pixels_per_cell=scale, pixel_multiple=scale * int(patch))


def _folder_problem(folder: Path, index: Mapping[str, Any], options: Any) -> str | None:
    """The experts the folder has against ``model.wan.expert``, and an image-to-video
    transformer (more input channels than the VAE has latent channels)."""
    expert = getattr(options, "expert", "auto")
    listed = (index.get("transformer_2") or [None])[0] is not None
    has_second = (folder / "transformer_2").is_dir()
    if listed and not has_second:
        return (
            f"model.path: {folder}/model_index.json lists transformer_2 but the folder has no "
            "transformer_2/ subfolder: complete the download of the model"
        )
    if expert == "both":
        return (
            "model.wan.expert=both: training both experts in one run is not available yet; "
            "train one expert per run (model.wan.expert=high_noise, then low_noise)"
        )
    if not has_second and expert != "auto":
        return (
            f"model.wan.expert={expert}: {folder} has one transformer (no transformer_2/), so "
            "there is no expert to choose; set model.wan.expert=auto"
        )
    if has_second and expert == "auto":
        return (
            f"model.wan.expert: {folder} is a WAN 2.2 A14B model with two experts "
            "(transformer/ for high noise, transformer_2/ for low noise); set "
            "model.wan.expert=high_noise or model.wan.expert=low_noise (one LoRA per expert)"
        )
    transformer = read_json(folder / "transformer" / "config.json") or {}
    vae = read_json(folder / "vae" / "config.json") or {}
    return image_to_video_problem(folder, transformer.get("in_channels"), vae.get("z_dim", 16))


def image_to_video_problem(folder: Path, in_channels: Any, z_dim: Any) -> str | None:
    """A transformer reading more channels than the VAE's latents (the image's too)."""
    if in_channels is None or in_channels == z_dim:
        return None
    return (
        f"model.path: {folder} is an image-to-video WAN model (transformer in_channels "
        f"{in_channels}, VAE latent channels {z_dim}); this version trains text-to-video "
        "models: WAN 2.1 T2V, WAN 2.2 T2V A14B and TI2V 5B"
    )


SPEC = FamilySpec(
    name="wan",
    title="WAN 2.1 / 2.2 text-to-video (1.3B, 14B, 2.2 A14B, 2.2 TI2V 5B)",
    implementation="modules.models.wan.family:WanFamily",
    single_file=SingleFileLayout(
        # Original and ComfyUI files name the attention self_attn, diffusers' attn1.
        markers=(r"^blocks\.\d+\.(?:self_attn|attn1)\.",),
        width=("patch_embedding.weight",),
        blocks={"num_layers": r"^blocks\.(\d+)\."},
    ),
    lora_targets=LORA_TARGETS,
    grid=LatentGrid(pixels_per_cell=8, pixel_multiple=16),
    options=WanOptions,
    video=True,
    grid_from_folder=_grid,
    label="WAN",
    folders=(
        FolderKind(
            title="WAN",
            pipeline="WanPipeline",
            parts={
                "transformer": ("WanTransformer3DModel",),
                "transformer_2": ("WanTransformer3DModel",),
                "vae": ("AutoencoderKLWan",),
                "text_encoder": ("UMT5EncoderModel", "umt5"),
            },
        ),
    ),
    parts=("transformer", "vae", "text_encoder", "tokenizer"),
    example="a download of Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    not_trained={
        "WanImageToVideoPipeline": "a WAN image-to-video folder",
        "WanVACEPipeline": "a WAN VACE folder, a video-editing model",
    },
    folder_check=_folder_problem,
)
