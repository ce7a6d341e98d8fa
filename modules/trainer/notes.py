"""What a run says at its start once the model has loaded: settings that are allowed but
probably not what the user meant (the checks before the model loads are in ``preflight``)."""

from __future__ import annotations

import torch

from modules.config import TrainConfig
from modules.models import LoadedModel, ModelFamily


def caption_length_notes(family: ModelFamily, model: LoadedModel, captions: list[str]) -> list[str]:
    """Captions longer than the text encoder reads: it sees only their start."""
    if not captions:
        return []
    lengths, limit = family.prompt_token_counts(model, captions)
    long = [caption for caption, n in zip(captions, lengths, strict=True) if n > limit]
    if not long:
        return []
    example = long[0] if len(long[0]) <= 60 else long[0][:57] + "..."
    return [
        f"{len(long)} of {len(captions)} distinct captions are longer than the {limit} tokens "
        f"the text encoder reads and are cut there (e.g. '{example}'): shorten them"
    ]


def family_notes(family: ModelFamily, model: LoadedModel) -> list[str]:
    """What the family says about the loaded model (its optional ``run_notes``: e.g. a
    step-distilled model that a plain LoRA de-distils)."""
    notes = getattr(family, "run_notes", None)
    return list(notes(model)) if notes is not None else []


def device_notes(config: TrainConfig, device: torch.device) -> list[str]:
    if device.type == "cpu" and config.training.mixed_precision == "fp16":
        return [
            "training.mixed_precision=fp16 does nothing on a CPU: this run trains in "
            "float32; use bf16 (CPUs support it) or no"
        ]
    return []
