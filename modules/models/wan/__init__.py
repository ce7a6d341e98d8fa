"""The ``wan`` family's declaration: its options, LoRA targets and latent grid (no torch).

The code is in :mod:`modules.models.wan.family`, imported only when the family is used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from modules.models.spec import (
    FILE_FIELD,
    FamilyOptions,
    FamilySpec,
    LatentGrid,
    fp8_base_field,
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
    expert: Literal["auto", "high_noise", "low_noise"] = Field(
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
            "gives its config, the VAE and the text encoder."
        ),
    )
    fp8_base: bool = fp8_base_field()


def _grid(folder: Path) -> LatentGrid | None:
    """The VAE's spatial factor (8; 16 for TI2V 5B) times the transformer's 2x2 patch."""
    vae = read_json(folder / "vae" / "config.json")
    if vae is None:
        return None
    scale = int(vae.get("scale_factor_spatial") or 8)
    transformer = read_json(folder / "transformer" / "config.json") or {}
    patch = (transformer.get("patch_size") or [1, 2, 2])[-1]
    return LatentGrid(pixels_per_cell=scale, pixel_multiple=scale * int(patch))


SPEC = FamilySpec(
    name="wan",
    title="WAN 2.1 / 2.2 text-to-video (1.3B, 14B, 2.2 A14B, 2.2 TI2V 5B)",
    implementation="modules.models.wan.family:WanFamily",
    lora_targets=LORA_TARGETS,
    grid=LatentGrid(pixels_per_cell=8, pixel_multiple=16),
    options=WanOptions,
    video=True,
    grid_from_folder=_grid,
)
