"""SDXL LoRAs in kohya's layout, which ComfyUI loads for SDXL (as do A1111 and diffusers).

kohya's sd-scripts name an SDXL LoRA's modules after the original (Stability's sgm) UNet, dots
as underscores: ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``, with
``.lora_down.weight`` (diffusers' ``lora_A``), ``.lora_up.weight`` (``lora_B``) and a scalar
``.alpha`` per module. The diffusers UNet's blocks map onto the sgm ones by position, with
``L`` = ``layers_per_block`` (2 for SDXL):

- ``down_blocks.i.attentions.j`` → ``input_blocks.{i (L + 1) + j + 1}.1``
- ``mid_block.attentions.0`` → ``middle_block.1``
- ``up_blocks.i.attentions.j`` → ``output_blocks.{i (L + 1) + j}.1`` (an up block has L + 1 layers)

Inside an attention the names are the same in both (``transformer_blocks.k.attn1.to_q``,
``ff.net.2``, ``proj_in``). diffusers reads such a file back with the UNet's config
(``StableDiffusionXLLoraLoaderMixin.lora_state_dict(..., unet_config=...)``).
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

PREFIX = "unet."
_ATTENTION = re.compile(r"^(down_blocks|mid_block|up_blocks)\.(?:(\d+)\.)?attentions\.(\d+)\.(.+)$")


def sgm_module(module: str, layers_per_block: int) -> str:
    """A diffusers UNet attention module's name (``down_blocks.1.attentions.0.proj_in``) in
    the original UNet (``input_blocks.4.1.proj_in``); a ValueError for other modules."""
    found = _ATTENTION.match(module)
    if found is None:
        raise ValueError(
            f"output.format=comfyui: '{module}' is outside the UNet's attention layers, which "
            "kohya's SDXL names cover here; train attention layers or use output.format=diffusers"
        )
    blocks, level, index, rest = found.groups()
    layers = layers_per_block + 1
    if blocks == "down_blocks":
        return f"input_blocks.{int(level) * layers + int(index) + 1}.1.{rest}"
    if blocks == "mid_block":
        return f"middle_block.1.{rest}"
    return f"output_blocks.{int(level) * layers + int(index)}.1.{rest}"


def to_comfyui(
    state: dict[str, Tensor], alpha: float, *, layers_per_block: int
) -> dict[str, Tensor]:
    """A diffusers-layout UNet LoRA (``unet.<module>.lora_A.weight``) in kohya's names."""
    if not isinstance(layers_per_block, int):
        raise ValueError(
            f"output.format=comfyui: this UNet's layers_per_block is {layers_per_block!r}, not "
            "one number as SDXL's; use output.format=diffusers"
        )
    converted: dict[str, Tensor] = {}
    for key, value in state.items():
        module, _, kind = key.removeprefix(PREFIX).rpartition(".lora_")
        if not key.startswith(PREFIX) or kind not in ("A.weight", "B.weight"):
            raise ValueError(
                f"output.format=comfyui: '{key}' is not a UNet lora_A / lora_B weight; use "
                "output.format=diffusers"
            )
        name = "lora_unet_" + sgm_module(module, layers_per_block).replace(".", "_")
        converted[f"{name}.lora_{'down' if kind[0] == 'A' else 'up'}.weight"] = value
        converted[f"{name}.alpha"] = torch.tensor(float(alpha))
    return converted
