"""The ComfyUI key layout of a WAN LoRA (the original WAN module names).

diffusers names each LoRA weight after the diffusers module, with rank and alpha in the file's
``lora_adapter_metadata``::

    transformer.blocks.0.attn1.to_q.lora_A.weight      (rank × in)
    transformer.blocks.0.attn1.to_q.lora_B.weight      (out × rank)

ComfyUI reads WAN LoRAs named after the original WAN implementation, with alpha per module::

    diffusion_model.blocks.0.self_attn.q.lora_down.weight   (= lora_A)
    diffusion_model.blocks.0.self_attn.q.lora_up.weight     (= lora_B)
    diffusion_model.blocks.0.self_attn.q.alpha              (0-d tensor)

Both apply ``W + (alpha / rank) * up @ down``, so the tensors are the same; only names change.
diffusers reads this layout back through ``WanLoraLoaderMixin.lora_state_dict`` (the family's
``lora_loader``). The demo family's transformer is a WAN transformer too, so its LoRAs convert
the same way; a UNet demo model has no ComfyUI layout here.
"""

from __future__ import annotations

import torch
from torch import Tensor

COMFYUI_PREFIX = "diffusion_model."
DIFFUSERS_PREFIX = "transformer."

_BLOCK_MODULES = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}
"""diffusers module inside ``blocks.N`` → original WAN module inside ``blocks.N``."""

_TOP_MODULES = {
    "proj_out": "head.head",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
}

_PARAMS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}


def original_module_name(module: str) -> str:
    """``blocks.3.attn1.to_q`` → ``blocks.3.self_attn.q``; a ValueError for unknown modules."""
    parts = module.split(".")
    if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit():
        inner = ".".join(parts[2:])
        if inner in _BLOCK_MODULES:
            return f"blocks.{parts[1]}.{_BLOCK_MODULES[inner]}"
    elif module in _TOP_MODULES:
        return _TOP_MODULES[module]
    raise ValueError(
        f"output.format=comfyui: the LoRA module '{module}' has no ComfyUI WAN name; train "
        "the attention and feed-forward layers only (lora.targets) or use output.format=diffusers"
    )


def to_comfyui(state: dict[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """A diffusers-layout WAN LoRA state dict (``transformer.`` keys) in ComfyUI's layout."""
    converted: dict[str, Tensor] = {}
    for key, value in state.items():
        if not key.startswith(DIFFUSERS_PREFIX):
            raise ValueError(f"'{key}' is not a diffusers transformer LoRA key")
        name = key[len(DIFFUSERS_PREFIX) :]
        param = next((p for p in _PARAMS if name.endswith("." + p)), None)
        if param is None:
            raise ValueError(
                f"output.format=comfyui: '{key}' is neither lora_A nor lora_B weight; use "
                "output.format=diffusers"
            )
        module = original_module_name(name[: -len(param) - 1])
        converted[f"{COMFYUI_PREFIX}{module}.{_PARAMS[param]}"] = value
        converted[f"{COMFYUI_PREFIX}{module}.alpha"] = torch.tensor(float(alpha))
    return converted
