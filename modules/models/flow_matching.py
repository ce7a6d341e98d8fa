"""Rectified-flow (flow matching) maths shared by the flow families (demo, WAN, FLUX, Qwen-Image).

Convention: ``t`` in (0, 1) is the noise level. ``x_t = (1 - t) * x_0 + t * noise`` and the model
predicts the velocity ``dx_t/dt = noise - x_0``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import Tensor


def shift_timesteps(t: Tensor, shift: float) -> Tensor:
    """The flow-shift remap ``s t / (1 + (s - 1) t)``: ``shift > 1`` favours high noise."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def sample_flow_timesteps(
    batch_size: int, *, generator: torch.Generator, device: torch.device, shift: float = 1.0
) -> Tensor:
    """Uniform ``t`` in (0, 1), then shifted. Drawn on the CPU generator so runs reproduce."""
    t = torch.rand(batch_size, generator=generator)
    t = t.clamp(1e-3, 1 - 1e-3)
    return shift_timesteps(t, shift).to(device)


def logit_normal_timesteps(
    batch_size: int, *, generator: torch.Generator, device: torch.device, shift: float = 1.0
) -> Tensor:
    """``t = sigmoid(n)``, ``n ~ N(0, 1)`` (SD3's choice), then shifted: the mid noise levels
    get the most steps and the ends still get some. ``shift`` moves the bulk towards high noise
    (it adds ``ln shift`` to ``n``). Drawn on the CPU generator so runs reproduce."""
    t = torch.sigmoid(torch.randn(batch_size, generator=generator))
    return shift_timesteps(t, shift).clamp(1e-3, 1 - 1e-3).to(device)


def flow_noisy_input_and_target(
    latents: Tensor, noise: Tensor, timesteps: Tensor
) -> tuple[Tensor, Tensor]:
    """``x_t`` and the velocity target ``noise - latents``; ``timesteps`` (B,) per sample."""
    t = timesteps.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
    noisy = (1 - t) * latents + t * noise
    return noisy, noise - latents


def euler_sample(
    velocity: Callable[[Tensor, Tensor], Tensor],
    noise: Tensor,
    *,
    steps: int,
    shift: float = 1.0,
    start: float = 1.0,
) -> Tensor:
    """Integrate ``dx/dt = velocity(x, t)`` from t=1 (pure noise) to t=0 with Euler steps.

    With ``start`` < 1, ``noise`` is an input already noised to ``t = start`` and only the grid's
    steps below ``start`` are taken (SDEdit-style: the layout comes from that input)."""
    grid = shift_timesteps(torch.linspace(1.0, 0.0, steps + 1), shift)
    if start < 1.0:
        grid = torch.cat([torch.tensor([start]), grid[grid < start]])
    x = noise
    for t_now, t_next in itertools.pairwise(grid):
        t_batch = torch.full((x.shape[0],), float(t_now), device=x.device)
        x = x + (float(t_next) - float(t_now)) * velocity(x, t_batch)
    return x
