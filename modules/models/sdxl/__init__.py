"""The ``sdxl`` family's declaration: SDXL base and its fine-tunes (no torch).

The code is in :mod:`modules.models.sdxl.family`, imported only when the family is used.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from modules.models.spec import (
    ConditioningKind,
    FamilyOptions,
    FamilySpec,
    FolderKind,
    LatentGrid,
    read_json,
)

_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
LORA_TARGETS = {
    # Self- and cross-attention (attn1, attn2) of every transformer layer of the UNet.
    "attention": _ATTENTION,
    # Also each transformer layer's feed-forward (GEGLU in, linear out).
    "attention_ffn": (*_ATTENTION, "ff.net.0.proj", "ff.net.2"),
}

SIZE_CROP = ConditioningKind(name="size_crop", source="item", with_geometry=True)
"""SDXL's micro-conditioning: each item's original size, the top-left of its crop and its
training size (the UNet's ``add_time_ids``), from how the buckets made the item."""

CHECKPOINT_SUFFIXES = (".safetensors", ".sft")
CHECKPOINT_MARKERS = {
    "model.diffusion_model.input_blocks.": "the UNet",
    "conditioner.embedders.0.transformer.": "the CLIP ViT-L text encoder",
    "conditioner.embedders.1.model.": "the OpenCLIP bigG text encoder",
    "first_stage_model.": "the VAE",
}
"""Key prefixes every SDXL checkpoint in the original layout has (what each holds)."""


class SdxlOptions(FamilyOptions):
    """``model.sdxl``."""

    prediction: Literal["auto", "epsilon", "v_prediction"] = Field(
        "auto",
        title="Prediction",
        description=(
            "What the UNet predicts: epsilon (the noise; SDXL base and most fine-tunes) or "
            "v_prediction (v-prediction fine-tunes such as NoobAI-XL V-Pred). auto: the "
            "scheduler config's prediction_type. A wrong choice trains the model against "
            "itself: set it when a v-prediction checkpoint's config says epsilon."
        ),
    )
    zero_terminal_snr: bool = Field(
        False,
        title="Zero terminal SNR",
        description=(
            "Rescale the noise schedule so its last timestep is pure noise (diffusers' "
            "rescale_betas_zero_snr, Lin et al. 2023), in training and in the samples (which "
            "then space their steps 'trailing'). For v-prediction models trained that way; "
            "with epsilon prediction the last timestep teaches nothing."
        ),
    )
    sample_cfg: float = Field(
        5.0,
        ge=1.0,
        le=20.0,
        title="Sample CFG scale",
        description=(
            "Classifier-free guidance of the training samples (the pipeline's guidance_scale, "
            "5 by default) against an empty negative prompt; 1 turns it off."
        ),
    )
    config_folder: str = Field(
        "",
        title="Config folder (single file)",
        description=(
            "For model.path a single .safetensors checkpoint in the original layout: a local "
            "SDXL diffusers folder whose JSON configs and tokenizers describe it (a download "
            "of stabilityai/stable-diffusion-xl-base-1.0 without its weights is enough). "
            "Empty: the folder the checkpoint is in, when it holds model_index.json."
        ),
    )

    def warnings(self) -> list[str]:
        if self.zero_terminal_snr and self.prediction == "epsilon":
            return [
                "model.sdxl.zero_terminal_snr with model.sdxl.prediction=epsilon: at the last "
                "timestep the input is the noise itself, so predicting it teaches nothing; zero "
                "terminal SNR is meant for v_prediction"
            ]
        return []


def _grid(folder: Path) -> LatentGrid | None:
    """The VAE's factor (2 per level after the first: 8) times the UNet's downsampling
    (2 per level after the first: 4)."""
    vae = read_json(folder / "vae" / "config.json")
    unet = read_json(folder / "unet" / "config.json")
    if vae is None or unet is None:
        return None
    scale = 2 ** (len(vae.get("block_out_channels") or [0] * 4) - 1)
    levels = len(unet.get("block_out_channels") or [0] * 3)
    return LatentGrid(pixels_per_cell=scale, pixel_multiple=scale * 2 ** (levels - 1))


def config_folder_of(file: Path, options: Any) -> Path:
    """The folder that gives a single-file checkpoint's configs and tokenizers:
    ``model.sdxl.config_folder``, else the checkpoint's own folder."""
    named = getattr(options, "config_folder", "") or ""
    return Path(named).expanduser() if named else file.parent


def checkpoint_keys(file: Path) -> list[str]:
    """The tensor names in a safetensors file's header (no weights are read)."""
    with file.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return [key for key in header if key != "__metadata__"]


def _file_problem(file: Path, options: Any) -> str | None:
    """A single-file SDXL checkpoint: the original layout (UNet, both text encoders and the
    VAE in one file) and a folder that gives its configs."""
    if file.suffix.lower() not in CHECKPOINT_SUFFIXES:
        return (
            f"model.path: {file} is neither a folder nor a .safetensors checkpoint; point "
            "model.path at an SDXL diffusers folder or a single-file SDXL .safetensors"
        )
    try:
        keys = checkpoint_keys(file)
    except (OSError, ValueError, struct.error) as error:
        return f"model.path: cannot read {file} as safetensors ({error}); re-download the file"
    missing = [
        what
        for prefix, what in CHECKPOINT_MARKERS.items()
        if not any(k.startswith(prefix) for k in keys)
    ]
    if missing:
        return (
            f"model.path: {file} is not a whole SDXL checkpoint in the original layout (it "
            f"lacks {', '.join(missing)}); give a full single-file SDXL model (base or a "
            "fine-tune, as A1111 and ComfyUI load them), or a diffusers folder"
        )
    folder = config_folder_of(file, options)
    named = bool(getattr(options, "config_folder", ""))
    where = "model.sdxl.config_folder" if named else f"model.sdxl.config_folder (empty: {folder})"
    if not (folder / "model_index.json").is_file():
        return (
            f"{where}: {folder} has no model_index.json; a single-file checkpoint needs a "
            "local SDXL diffusers folder for its configs and tokenizers (its weights are not "
            "read): set model.sdxl.config_folder to one, e.g. a download of "
            "stabilityai/stable-diffusion-xl-base-1.0"
        )
    from modules.models.folder_check import model_folder_problem

    problem = model_folder_problem("sdxl", str(folder))
    return f"{where}: {problem}" if problem else None


def _summary(folder: Path, options: Any) -> str | None:
    """The prediction type the run trains with."""
    scheduler = read_json(folder / "scheduler" / "scheduler_config.json") or {}
    return "SDXL, " + prediction_words(scheduler, options)


def prediction_words(scheduler: Mapping[str, Any], options: Any) -> str:
    chosen = getattr(options, "prediction", "auto")
    found = scheduler.get("prediction_type") or "epsilon"
    prediction = found if chosen == "auto" else chosen
    source = "from the scheduler config" if chosen == "auto" else "model.sdxl.prediction"
    snr = ", zero terminal SNR" if getattr(options, "zero_terminal_snr", False) else ""
    return f"{prediction} prediction ({source}){snr}"


SPEC = FamilySpec(
    name="sdxl",
    title="SDXL base and fine-tunes (UNet, two CLIP text encoders, size and crop conditioning)",
    implementation="modules.models.sdxl.family:SdxlFamily",
    lora_targets=LORA_TARGETS,
    grid=LatentGrid(pixels_per_cell=8, pixel_multiple=32),
    options=SdxlOptions,
    grid_from_folder=_grid,
    label="SDXL",
    folders=(
        FolderKind(
            title="SDXL",
            pipeline="StableDiffusionXLPipeline",
            parts={
                "unet": ("UNet2DConditionModel",),
                "vae": ("AutoencoderKL",),
                "text_encoder": ("CLIPTextModel", "clip_text_model"),
                "text_encoder_2": ("CLIPTextModelWithProjection", "clip_text_model"),
            },
        ),
    ),
    parts=(
        *("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
        "scheduler",
    ),
    example="a download of stabilityai/stable-diffusion-xl-base-1.0",
    not_trained={
        "StableDiffusionXLImg2ImgPipeline": "an SDXL refiner folder (one text encoder)",
        "StableDiffusionXLInpaintPipeline": "an SDXL inpainting folder (a 9-channel UNet)",
        "StableDiffusionXLInstructPix2PixPipeline": "an SDXL InstructPix2Pix folder",
    },
    conditioning=(SIZE_CROP,),
    file_check=_file_problem,
    folder_summary=_summary,
)
