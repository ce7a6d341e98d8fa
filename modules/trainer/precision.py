"""``training.mixed_precision`` for one run: autocast around the forwards and, for fp16 on a
GPU, the loss scaler.

The trainer does this itself rather than through accelerate's mixed-precision setting, which
accelerate keeps in a process-wide state that refuses a second mode in the same process: the
UI runs many trainings, each with its own config, in one process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from contextlib import AbstractContextManager

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    def __init__(self, mixed_precision: str, device: torch.device) -> None:
        dtype = _DTYPES.get(mixed_precision)
        if dtype is torch.float16 and device.type == "cpu":
            dtype = None  # CPUs have no fp16 autocast worth the name; the run says so
        self.device_type = device.type
        self.dtype = dtype
        self.scaler = torch.amp.GradScaler(device.type) if dtype is torch.float16 else None
        """fp16's loss scaler; it skips a step whose gradients are not finite by itself."""

    def autocast(self) -> AbstractContextManager[None]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring the gradients back to their true scale (before clipping or measuring them)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()

    def clip(self, params: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
        """The gradients' total norm, clipped to ``max_norm`` when it is > 0."""
        grads = [p for p in params if p.grad is not None]
        if max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(grads, max_norm)
        return torch.nn.utils.get_total_norm([p.grad for p in grads])
