"""Rectified-flow (flow matching) maths shared by the flow families (demo, WAN, FLUX, Qwen-Image).

Convention: ``t`` in (0, 1) is the noise level. ``x_t = (1 - t) * x_0 + t * noise`` and the model
predicts the velocity ``dx_t/dt = noise - x_0``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

T_MIN, T_MAX = 1e-3, 1 - 1e-3
"""Training timesteps stay inside (0, 1): the ends give a zero target or a zero input."""


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


@dataclass(frozen=True)
class ScheduleShift:
    """The timestep shift of a diffusers ``FlowMatchEulerDiscreteScheduler``, read from a model
    folder's ``scheduler/scheduler_config.json``, so training and sampling shift ``t`` by the
    same rule as the family's own pipeline.

    - Static (``use_dynamic_shifting`` false): ``s t / (1 + (s - 1) t)`` with ``shift`` s.
    - Dynamic (FLUX.1, FLUX.2, Qwen-Image): the pipeline computes ``mu`` from the image's token
      count (:meth:`mu_for` is FLUX.1's and Qwen-Image's ``calculate_shift``; FLUX.2 has its own)
      and shifts ``exp(mu) / (exp(mu) + (1 / t - 1))`` (exponential) or ``mu / (mu + (1 / t -
      1))`` (linear).
    - ``shift_terminal`` (Qwen-Image): the shifted schedule is stretched in ``1 - t`` so that its
      last step lands on that value; the stretch is anchored at the schedule's last point.
    """

    shift: float = 1.0
    dynamic: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_seq_len: int = 256
    max_seq_len: int = 4096
    exponential: bool = True
    terminal: float | None = None

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any]) -> ScheduleShift:
        def value(name: str, default: Any) -> Any:
            found = config.get(name)
            return default if found is None else found

        return cls(
            shift=float(value("shift", 1.0)),
            dynamic=bool(value("use_dynamic_shifting", False)),
            base_shift=float(value("base_shift", 0.5)),
            max_shift=float(value("max_shift", 1.15)),
            base_seq_len=int(value("base_image_seq_len", 256)),
            max_seq_len=int(value("max_image_seq_len", 4096)),
            exponential=value("time_shift_type", "exponential") == "exponential",
            terminal=float(config["shift_terminal"]) if config.get("shift_terminal") else None,
        )

    def mu_for(self, seq_len: int) -> float:
        """``mu`` growing linearly with the image token count, from (base_seq_len, base_shift)
        to (max_seq_len, max_shift)."""
        slope = (self.max_shift - self.base_shift) / (self.max_seq_len - self.base_seq_len)
        return seq_len * slope + self.base_shift - slope * self.base_seq_len

    def apply(self, t: Tensor, mu: float | None = None) -> Tensor:
        """Shift ``t`` in (0, 1) point by point (no terminal stretch); ``mu`` when dynamic."""
        if not self.dynamic:
            return shift_timesteps(t, self.shift)
        if mu is None:
            raise ValueError("a dynamic (resolution-dependent) shift needs mu")
        odds = (1 / t - 1).clamp(min=0)
        scale = math.exp(mu) if self.exponential else mu
        return scale / (scale + odds)

    def stretch(self, shifted: Tensor, anchor: float) -> Tensor:
        """The terminal stretch: ``anchor`` (a shifted value) maps to ``terminal``, 1 stays 1."""
        if self.terminal is None:
            return shifted
        factor = (1 - anchor) / (1 - self.terminal)
        return 1 - (1 - shifted) / factor

    def sigmas(self, grid: Tensor, mu: float | None = None) -> Tensor:
        """A sampling schedule as the scheduler's ``set_timesteps(sigmas=grid, mu=mu)`` makes it
        (without the final 0): shifted, then stretched to end at ``terminal``."""
        shifted = self.apply(grid, mu)
        return self.stretch(shifted, float(shifted[-1]))


class FlowMatching:
    """The Protocol methods every flow-matching family shares (a mixin): ``t`` is the noise
    fraction of the interpolation, so ``drift.timesteps`` are taken as they are, and the
    target is the velocity."""

    def timesteps_from_fractions(self, fractions: Tensor, shape: torch.Size) -> Tensor:
        return fractions

    def noisy_input_and_target(
        self, latents: Tensor, noise: Tensor, timesteps: Tensor
    ) -> tuple[Tensor, Tensor]:
        return flow_noisy_input_and_target(latents, noise, timesteps)


class ShiftedByTokens(FlowMatching):
    """Training timesteps of a family whose pipeline shifts its schedule by the image's token
    count (FLUX.1, FLUX.2, Qwen-Image): uniform ``t``, shifted by ``self.shift`` (read from the
    model folder's scheduler config) with ``self.training_mu(shape)``."""

    shift: ScheduleShift

    def training_mu(self, shape: torch.Size) -> float:
        """The shift's ``mu`` for latents of ``shape`` (B, C, h, w)."""
        raise NotImplementedError

    def sample_timesteps(
        self, shape: torch.Size, *, generator: torch.Generator, device: torch.device
    ) -> Tensor:
        u = torch.rand(shape[0], generator=generator).clamp(T_MIN, T_MAX)
        return self.shift.apply(u, self.training_mu(shape)).clamp(T_MIN, T_MAX).to(device)
