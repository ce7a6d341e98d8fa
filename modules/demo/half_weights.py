"""Small networks shipped as float16 safetensors, what they need to be rebuilt in the
metadata (the demo's world classifier and subject judge)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn


def save_half(module: nn.Module, path: str | Path, metadata: dict[str, str]) -> None:
    """``module``'s weights in float16 (other tensors as they are) with ``metadata``."""
    tensors = {
        k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).contiguous()
        for k, v in module.state_dict().items()
    }
    save_file(tensors, str(path), metadata=metadata)


def read_half(
    path: str | Path, *, needs: str, what: str, script: str
) -> tuple[dict[str, str], dict[str, Tensor]]:
    """(metadata, float32 state) of a file :func:`save_half` wrote; errors name ``what`` the
    file holds, the metadata key it ``needs`` and the ``script`` that writes it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} weights {path} not found; write them with `python -m {script} --out PATH`"
        )
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if needs not in metadata:
        raise ValueError(f"{path} has no {needs} in its metadata; retrain it with {script}")
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    return metadata, state
