"""The ``demo`` family's declaration: LoRA targets and latent grid (no torch).

The code is in :mod:`modules.models.demo.family`, imported only when the family is used.
"""

from __future__ import annotations

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

SPEC = FamilySpec(
    name="demo",
    title="a tiny built-in model that trains on a laptop CPU",
    implementation="modules.models.demo.family:DemoFamily",
    lora_targets=UNET_LORA_TARGETS,
    grid=LatentGrid(pixels_per_cell=CODEC_FACTOR, pixel_multiple=16),
    needs_path=False,
)

__all__ = ["CODEC_FACTOR", "SPEC", "TRANSFORMER_LORA_TARGETS", "UNET_LORA_TARGETS"]
