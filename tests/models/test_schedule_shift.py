"""The resolution-dependent timestep shift equals diffusers' scheduler, config for config."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from modules.models.flow_matching import ScheduleShift, shift_timesteps

CONFIGS = {
    # FLUX.1 dev's scheduler_config.json (schnell: shift 1, no dynamic shifting).
    "flux1-dev": {
        "shift": 3.0,
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    },
    "flux1-schnell": {"shift": 1.0, "use_dynamic_shifting": False},
    # Qwen-Image's: dynamic, exponential, stretched to end at 0.02.
    "qwen-image": {
        "shift": 1.0,
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 0.9,
        "base_image_seq_len": 256,
        "max_image_seq_len": 8192,
        "shift_terminal": 0.02,
        "time_shift_type": "exponential",
    },
    "linear": {"use_dynamic_shifting": True, "time_shift_type": "linear", "max_shift": 2.0},
    "static": {"shift": 3.0},
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("seq_len", [16, 1024, 4096])
def test_sampling_schedule_equals_the_scheduler_s(name, seq_len):
    scheduler = FlowMatchEulerDiscreteScheduler(**CONFIGS[name])
    rule = ScheduleShift.from_scheduler_config(scheduler.config)
    steps = 20
    grid = np.linspace(1.0, 1 / steps, steps)  # what FLUX.1 and Qwen-Image pipelines pass
    mu = rule.mu_for(seq_len) if rule.dynamic else None
    scheduler.set_timesteps(sigmas=grid, mu=mu)
    ours = rule.sigmas(torch.tensor(grid, dtype=torch.float32), mu)
    assert torch.allclose(ours, scheduler.sigmas[:-1], atol=1e-6)


def test_mu_is_the_pipelines_calculate_shift():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    rule = ScheduleShift.from_scheduler_config(CONFIGS["qwen-image"])
    for seq_len in (64, 256, 1024, 8192):
        assert rule.mu_for(seq_len) == pytest.approx(
            calculate_shift(seq_len, 256, 8192, 0.5, 0.9), abs=1e-12
        )


def test_more_tokens_shift_training_towards_noise():
    rule = ScheduleShift.from_scheduler_config(CONFIGS["flux1-dev"])
    t = torch.linspace(0.05, 0.95, 19)
    small, large = rule.apply(t, rule.mu_for(256)), rule.apply(t, rule.mu_for(4096))
    assert bool((large > small).all()) and bool((small > 0).all()) and bool((large < 1).all())
    assert torch.allclose(rule.apply(t, 0.0), t, atol=1e-6)  # mu = 0: no shift
    static = ScheduleShift.from_scheduler_config(CONFIGS["static"])
    assert torch.equal(static.apply(t), shift_timesteps(t, 3.0))
    with pytest.raises(ValueError, match="needs mu"):
        rule.apply(t)
