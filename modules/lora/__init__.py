"""LoRA adapters (peft) on the family's denoiser, and the teacher switch."""

from modules.lora.lora import (
    NonFiniteLoraError,
    add_lora,
    join_adapters,
    load_lora,
    lora_disabled,
    lora_prefix,
    lora_state_dict,
    save_lora,
)

__all__ = [
    "NonFiniteLoraError",
    "add_lora",
    "join_adapters",
    "load_lora",
    "lora_disabled",
    "lora_prefix",
    "lora_state_dict",
    "save_lora",
]
