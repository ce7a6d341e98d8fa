"""When the prior acts: the prior weight's schedule over the run and the noise levels it is
gated to. Pure maths on numbers and tensors, no config objects.

- :func:`prior_weight_at`: ``constant`` is the weight at every step; ``warmup`` rises linearly
  from 0 at the first step to the weight at ``share`` of the run; ``decay`` holds the weight
  until the last ``share`` of the run, then falls linearly to 0 at the last step.
- :func:`in_noise_range`: which samples' timesteps lie in the noise range the prior acts on;
  outside it the prior term is zero and the teacher need not run for them.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

Schedule = Literal["constant", "warmup", "decay"]


def prior_weight_at(
    weight: float, schedule: Schedule, share: float, step: int, steps: int
) -> float:
    """The prior weight of optimizer step ``step`` (0 for the first) of ``steps``."""
    if schedule == "constant" or weight == 0:
        return weight
    if not 0 < share <= 1:
        raise ValueError(f"share must lie in (0, 1], not {share}")
    progress = step / (steps - 1) if steps > 1 else 1.0  # 0 at the first step, 1 at the last
    if schedule == "warmup":
        return weight * min(1.0, progress / share)
    if schedule == "decay":
        return weight * min(1.0, (1.0 - progress) / share)
    raise ValueError(f"unknown prior schedule {schedule!r}")


def in_noise_range(timesteps: Tensor, low: Tensor | float, high: Tensor | float) -> Tensor:
    """(B,) bool: the samples whose ``timesteps`` lie in ``[low, high]`` (the bounds in the
    timesteps' own convention)."""
    return (timesteps >= low) & (timesteps <= high)
