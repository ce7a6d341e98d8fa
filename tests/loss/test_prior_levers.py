"""The prior weight's schedule and the noise range the prior acts on."""

import pytest
import torch

from modules.loss.prior_levers import in_noise_range, prior_weight_at


def weights(schedule, steps=11, share=0.5, weight=2.0):
    return [prior_weight_at(weight, schedule, share, step, steps) for step in range(steps)]


def test_constant_is_the_weight_at_every_step():
    assert weights("constant") == [2.0] * 11


def test_warmup_rises_from_zero_to_the_weight_over_its_share_then_holds():
    assert weights("warmup") == pytest.approx([0, 0.4, 0.8, 1.2, 1.6, 2, 2, 2, 2, 2, 2])


def test_decay_holds_the_weight_then_falls_to_zero_at_the_last_step():
    assert weights("decay") == pytest.approx([2, 2, 2, 2, 2, 2, 1.6, 1.2, 0.8, 0.4, 0])


def test_a_whole_run_share_and_a_single_step():
    assert weights("warmup", steps=5, share=1.0) == pytest.approx([0, 0.5, 1, 1.5, 2])
    assert prior_weight_at(2.0, "decay", 0.5, 0, 1) == 0.0  # a one-step run is its last step
    assert weights("decay", weight=0.0) == [0.0] * 11
    with pytest.raises(ValueError, match="share"):
        prior_weight_at(1.0, "warmup", 0.0, 0, 10)


def test_the_noise_range_includes_its_bounds():
    t = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    assert in_noise_range(t, 0.25, 0.75).tolist() == [False, True, True, True, False]
