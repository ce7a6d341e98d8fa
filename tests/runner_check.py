"""A check every family's tests make: ``predict`` calls the denoiser through ``model.runner``,
which is how the trainer's data-parallel wrapper (several processes) gets the student's
forward and so averages its gradients."""

from __future__ import annotations

from dataclasses import replace

import torch

from modules.models.base import LoadedModel, ModelFamily


class _Counting(torch.nn.Module):
    """Stands where DDP would: counts the calls and passes them on."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


def assert_predict_goes_through_the_runner(
    family: ModelFamily, model: LoadedModel, noisy, timesteps, text, expected
) -> None:
    counting = _Counting(model.denoiser)
    with torch.no_grad():
        out = family.predict(replace(model, wrapper=counting), noisy, timesteps, text)
    assert counting.calls >= 1, f"{family.name}: predict did not call model.runner"
    assert torch.equal(out, expected.detach())
