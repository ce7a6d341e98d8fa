"""The ``demo`` family's declaration: LoRA targets and latent grid (no torch).

The code is in :mod:`modules.models.demo.family`, imported only when the family is used.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from modules.models.spec import FamilySpec, LatentGrid
from modules.models.wan import LORA_TARGETS as TRANSFORMER_LORA_TARGETS

CODEC_FACTOR = 4
"""The pixel-unshuffle codec's factor: one latent cell per 4 x 4 pixels."""

UNET_LORA_TARGETS = {
    "attention": ("to_q", "to_k", "to_v", "to_out.0"),
    "attention_ffn": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"),
    # The ResNet blocks' convolutions as well (LoCon): a UNet's attention sits only at its lower
    # resolutions, so without them a LoRA cannot reach the fine detail of a subject.
    "attention_conv": ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in", "proj_out"),
}
"""The LoRA target presets of a diffusers ``UNet2DConditionModel`` (the built-in demo model);
a demo model with the WAN transformer has :data:`TRANSFORMER_LORA_TARGETS`."""

BUILTIN_WEIGHTS = Path(__file__).parent.with_name("demo_weights")
"""The built-in model's folder (a UNet); without it the model is built from its config."""
ARCHITECTURES = {"wan": "transformer", "unet": "unet"}
"""Denoiser architecture → the subfolder of a demo model folder that holds it."""
FOLDER_PARTS = "transformer/ or unet/, text_encoder/ and tokenizer/"


def _folder_problem(folder: Path, index: Mapping[str, Any], options: Any) -> str | None:
    """One denoiser subfolder, the text encoder and the tokenizer."""
    found = [name for name in ARCHITECTURES.values() if (folder / name).is_dir()]
    if len(found) > 1:
        return (
            f"model.path: {folder} holds both transformer/ and unet/; a demo model folder holds "
            "one denoiser: move the other one out"
        )
    missing = [] if found else ["transformer (or unet)"]
    missing += [part for part in ("text_encoder", "tokenizer") if not (folder / part).is_dir()]
    if missing:
        return (
            f"model.path: {folder} has no {', '.join(missing)} subfolder; a demo model folder "
            f"holds {FOLDER_PARTS}"
        )
    return None


def _denoiser_targets(path: str) -> tuple[str, Mapping[str, tuple[str, ...]]]:
    """A folder with transformer/ holds a WAN transformer; the built-in model is a UNet."""
    folder = Path(path).expanduser() if path else BUILTIN_WEIGHTS
    if (folder / ARCHITECTURES["wan"]).is_dir():
        return "WanTransformer3DModel", TRANSFORMER_LORA_TARGETS
    return "UNet2DConditionModel", UNET_LORA_TARGETS


UNET_HAS_NO_COMFYUI = (
    "output.format=comfyui: the ComfyUI layout here is WAN's, and this model's denoiser is "
    "a UNet2DConditionModel; set output.format=diffusers"
)


def _comfyui_problem(path: str) -> str | None:
    """The ComfyUI layout here is WAN's: a demo transformer has it, the UNet not."""
    if _denoiser_targets(path)[0] == "WanTransformer3DModel":
        return None
    return UNET_HAS_NO_COMFYUI


SPEC = FamilySpec(
    name="demo",
    title="a tiny built-in model that trains on a laptop CPU",
    implementation="modules.models.demo.family:DemoFamily",
    lora_targets=UNET_LORA_TARGETS,
    grid=LatentGrid(pixels_per_cell=CODEC_FACTOR, pixel_multiple=16),
    needs_path=False,
    example=FOLDER_PARTS,
    folder_check=_folder_problem,
    denoiser_targets=_denoiser_targets,
    comfyui_check=_comfyui_problem,
)

__all__ = [
    "ARCHITECTURES",
    "BUILTIN_WEIGHTS",
    "CODEC_FACTOR",
    "SPEC",
    "TRANSFORMER_LORA_TARGETS",
    "UNET_HAS_NO_COMFYUI",
    "UNET_LORA_TARGETS",
]
