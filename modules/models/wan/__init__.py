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
    ConditioningKind,
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
            "above the boundary (boundary_ratio in model_index.json; if absent 0.875 for "
            "text-to-video, 0.9 for image-to-video) and "
            "low_noise (transformer_2/) below it. The LoRA trains the chosen one on its own "
            "timestep range, and the teacher is the same expert. both: one LoRA per expert in "
            "one run (each step's timesteps choose the expert), saved as NAME-high_noise and "
            "NAME-low_noise. auto: the only transformer of a one-transformer model (WAN 2.1, "
            "TI2V 5B)."
        ),
    )
    task: Literal["auto", "text_to_video", "image_to_video"] = Field(
        "auto",
        title="Task",
        description=(
            "What the LoRA learns. image_to_video: each clip's first frame is given and the "
            "model learns the rest of the clip (the frames it predicts carry the loss). auto: "
            "image-to-video for a WAN 2.1 / 2.2 I2V folder (WanImageToVideoPipeline), "
            "text-to-video for a T2V or TI2V 5B folder; TI2V 5B trains either (set "
            "image_to_video for its image-to-video form)."
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
    """The experts the folder has against ``model.wan.expert``, WAN 2.1 I2V's image encoder,
    and ``model.wan.task`` against what the folder's model does."""
    expert = getattr(options, "expert", "auto")
    listed = (index.get("transformer_2") or [None])[0] is not None
    has_second = (folder / "transformer_2").is_dir()
    if listed and not has_second:
        return (
            f"model.path: {folder}/model_index.json lists transformer_2 but the folder has no "
            "transformer_2/ subfolder: complete the download of the model"
        )
    if not has_second and expert == "both":
        return (
            f"model.wan.expert=both: {folder} has one transformer (no transformer_2/): only a "
            "WAN 2.2 A14B folder has two experts to train; set model.wan.expert=auto"
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
            "model.wan.expert=high_noise or low_noise (one LoRA per expert), or both (two LoRAs "
            "in one run)"
        )
    if wan_form(folder) == "i2v_21":
        missing = [p for p in ("image_encoder", "image_processor") if not (folder / p).is_dir()]
        if missing:
            return (
                f"model.path: {folder} is a WAN 2.1 image-to-video model and has no "
                f"{missing[0]}/ subfolder (its CLIP image encoder encodes each first frame): "
                "complete the download of the model"
            )
    return _task_problem(folder, getattr(options, "task", "auto"))


WanForm = Literal["t2v", "t2v_a14b", "i2v_21", "i2v_a14b", "ti2v"]
FORM_TITLES: dict[str, str] = {
    "t2v": "WAN 2.1 text-to-video",
    "t2v_a14b": "WAN 2.2 A14B text-to-video (two experts)",
    "i2v_21": "WAN 2.1 image-to-video (CLIP image encoder)",
    "i2v_a14b": "WAN 2.2 A14B image-to-video (two experts)",
    "ti2v": "WAN 2.2 TI2V 5B (text- or image-to-video)",
}
"""Each form of WAN folder in words (the Model tab shows the detected one)."""


def wan_form(folder: Path) -> WanForm | None:
    """The folder's form, told apart as the diffusers pipelines do: a transformer reading more
    channels than the VAE's latents is image-to-video (the first frame's latents and mask are
    concatenated), with a CLIP image encoder when it has ``image_dim`` (2.1); TI2V 5B is
    ``expand_timesteps`` (per-token timesteps). None: no readable transformer config."""
    transformer = read_json(folder / "transformer" / "config.json")
    if transformer is None:
        return None
    index = read_json(folder / "model_index.json") or {}
    vae = read_json(folder / "vae" / "config.json") or {}
    two = (folder / "transformer_2").is_dir()
    if transformer.get("in_channels", 16) != vae.get("z_dim", 16):
        return "i2v_21" if transformer.get("image_dim") else "i2v_a14b"
    if index.get("expand_timesteps"):
        return "ti2v"
    return "t2v_a14b" if two else "t2v"


def trains_image_to_video(folder: Path, options: Any) -> bool:
    """Whether a run on ``folder`` with ``model.wan`` = ``options`` trains image-to-video."""
    form = wan_form(folder)
    if form in ("i2v_21", "i2v_a14b"):
        return True
    return form == "ti2v" and getattr(options, "task", "auto") == "image_to_video"


FIRST_FRAME = ConditioningKind(name="first_frame", source="item", clips_only=True)
"""An image-to-video item's conditioning: its clip's first frame."""


def _conditioning(folder: Path, options: Any) -> tuple[ConditioningKind, ...]:
    return (FIRST_FRAME,) if trains_image_to_video(folder, options) else ()


def _summary(folder: Path, options: Any) -> str | None:
    """The detected form and what a run trains on it, for the Model tab."""
    form = wan_form(folder)
    if form is None:
        return None
    task = "image-to-video" if trains_image_to_video(folder, options) else "text-to-video"
    problem = _task_problem(folder, getattr(options, "task", "auto"))
    return f"Detected: {FORM_TITLES[form]}; trains {task}" if problem is None else problem


def _task_problem(folder: Path, task: str) -> str | None:
    """``model.wan.task`` against what the folder's model can do."""
    form = wan_form(folder)
    if task == "text_to_video" and form in ("i2v_21", "i2v_a14b"):
        return (
            f"model.wan.task=text_to_video: {folder} is an image-to-video model "
            f"({FORM_TITLES[form]}); set model.wan.task=auto (or image_to_video)"
        )
    if task == "image_to_video" and form in ("t2v", "t2v_a14b"):
        return (
            f"model.wan.task=image_to_video: {folder} is a text-to-video model "
            f"({FORM_TITLES[form]}); use an I2V or TI2V 5B folder, or set model.wan.task=auto"
        )
    return None


SPEC = FamilySpec(
    name="wan",
    title="WAN 2.1 / 2.2 text- and image-to-video (1.3B, 14B, 2.2 A14B, 2.2 TI2V 5B)",
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
        FolderKind(
            title="WAN image-to-video",
            pipeline="WanImageToVideoPipeline",
            parts={
                "transformer": ("WanTransformer3DModel",),
                "transformer_2": ("WanTransformer3DModel",),
                "vae": ("AutoencoderKLWan",),
                "text_encoder": ("UMT5EncoderModel", "umt5"),
                "image_encoder": ("CLIPVisionModelWithProjection", "clip_vision_model"),
            },
        ),
    ),
    parts=("transformer", "vae", "text_encoder", "tokenizer"),
    example="a download of Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    not_trained={
        "WanVACEPipeline": "a WAN VACE folder, a video-editing model",
    },
    folder_check=_folder_problem,
    conditioning_from_folder=_conditioning,
    folder_summary=_summary,
)
