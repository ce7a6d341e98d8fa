"""The training step on its own: the demo family's real model with a LoRA, a batch made here,
no trainer, no dataset, no run folder."""

import contextlib
import random

import pytest
import torch
import torch.nn.functional as F

from modules.config import config_from_dict
from modules.data.dataset import Batch
from modules.lora import add_lora, lora_disabled
from modules.models.demo.family import DemoFamily
from modules.trainer.processes import Processes, take
from modules.trainer.step import StepParts, train_step

SEED = 7


@pytest.fixture(scope="module")
def model():
    """The shipped demo model with a LoRA whose up-projections are not zero: the student and
    the teacher differ."""
    family = DemoFamily()
    loaded = family.load("", dtype=torch.float32, device=torch.device("cpu"))
    torch.manual_seed(0)
    add_lora(
        loaded.denoiser,
        rank=4,
        alpha=4,
        dropout=0.0,
        target_modules=family.lora_targets(loaded)["attention"],
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, weight in loaded.denoiser.named_parameters():
            if "lora_B" in name:
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.05)
    loaded.denoiser.eval()
    return loaded


def make_batch(model, prior_prediction=(False, False, False, False)) -> Batch:
    """Four 8 x 8 latents: masks all ones (no prior region), half zero, all ones, a quarter zero."""
    generator = torch.Generator().manual_seed(2)
    masks = torch.ones(4, 1, 8, 8)
    masks[1, :, :, :4] = 0.0
    masks[3, :, :4, :4] = 0.0
    text = DemoFamily().encode_prompts(model, ["a red ball", "a cat", "", "a blue cube"])
    return Batch(
        latents=torch.randn(4, 48, 8, 8, generator=generator),
        masks=masks,
        text=text,
        prior_prediction=torch.tensor(prior_prediction),
        loss_weight=torch.tensor([1.0, 1.0, 0.5, 2.0]),
        has_mask=torch.tensor([True, True, False, True]),
        caption_dropped=torch.zeros(4, dtype=torch.bool),
    )


def make_parts(model, *, processes=None, family=None, **sections) -> StepParts:
    """The step's parts for ``model`` (the demo family's unless ``family``), masks on, prior
    weight 1, unless ``sections`` say otherwise."""
    sections = {"mask": {"enabled": True}, "prior": {"weight": 1.0}, **sections}
    config = config_from_dict(sections)
    return StepParts(
        family=family or DemoFamily(),
        model=model,
        student=model,
        mask=config.mask,
        prior=config.prior,
        generator=torch.Generator().manual_seed(SEED),
        mask_rng=random.Random(SEED),
        device=torch.device("cpu"),
        autocast=contextlib.nullcontext,
        processes=processes or Processes(),
    )


class PredictSpy:
    """The batch size of each call to the family's ``predict`` (the real one runs)."""

    def __init__(self, monkeypatch):
        self.sizes: list[int] = []
        original = DemoFamily.predict

        def predict(family, model, noisy, timesteps, text):
            self.sizes.append(noisy.shape[0])
            return original(family, model, noisy, timesteps, text)

        monkeypatch.setattr(DemoFamily, "predict", predict)


def test_the_teacher_runs_only_on_the_samples_with_a_prior_region(model, monkeypatch):
    spy = PredictSpy(monkeypatch)
    result = train_step(make_batch(model), make_parts(model), prior_weight=1.0)
    assert spy.sizes == [2, 4]  # samples 1 and 3 have a prior region; then the student
    assert result.teacher_fraction == 0.5
    assert float(result.loss.prior.detach()) > 0


def test_the_teacher_is_skipped_when_no_sample_needs_it(model, monkeypatch):
    batch = make_batch(model)
    batch.masks[:] = 1.0
    spy = PredictSpy(monkeypatch)
    result = train_step(batch, make_parts(model), prior_weight=1.0)
    assert spy.sizes == [4]  # the student only
    assert result.teacher_fraction == 0.0
    assert float(result.loss.prior.detach()) == 0.0
    assert float(result.loss.target.detach()) > 0


def test_a_prior_weight_of_zero_needs_no_teacher(model, monkeypatch):
    spy = PredictSpy(monkeypatch)
    result = train_step(make_batch(model), make_parts(model), prior_weight=0.0)
    assert spy.sizes == [4]
    assert result.teacher_fraction == 0.0


def test_the_weight_maps_are_made_once_per_step(model, monkeypatch):
    """The teacher's samples and the loss read the same maps: the weighting runs once."""
    import modules.loss.masked_loss as masked_loss
    import modules.trainer.step as step_module

    calls = []
    original = masked_loss.process_masks

    def counted(mask, **settings):
        calls.append(tuple(mask.shape))
        return original(mask, **settings)

    monkeypatch.setattr(masked_loss, "process_masks", counted)
    monkeypatch.setattr(step_module, "process_masks", counted, raising=False)  # any copy
    sections = {"mask": {"enabled": True, "gamma": 0.7}}
    result = train_step(make_batch(model), make_parts(model, **sections), prior_weight=1.0)
    assert calls == [(4, 1, 8, 8)]
    assert result.teacher_fraction == 0.5 and float(result.loss.prior.detach()) > 0


def test_a_prior_prediction_sample_learns_the_teacher_prediction(model):
    """Masks off, one sample from a prior_prediction concept: its target is the base model's
    prediction, computed here by hand from the same draws."""
    batch = make_batch(model, prior_prediction=(False, False, True, False))
    parts = make_parts(model, mask={"enabled": False}, prior={"weight": 0.0})
    result = train_step(batch, parts, prior_weight=0.0)
    assert result.teacher_fraction == 0.25

    family, generator = DemoFamily(), torch.Generator().manual_seed(SEED)
    noise = torch.randn(batch.latents.shape, generator=generator)
    t = family.sample_timesteps(batch.latents.shape, generator=generator, device="cpu")
    noisy, target = family.noisy_input_and_target(batch.latents, noise, t)
    with torch.no_grad():
        student = family.predict(model, noisy, t, batch.text)
        with lora_disabled(model.denoiser):
            teacher = family.predict(model, noisy, t, batch.text)
    target[2] = teacher[2]
    per_sample = F.mse_loss(student, target, reduction="none").mean(dim=(1, 2, 3))
    expected = (per_sample * batch.loss_weight).mean()
    assert torch.allclose(result.loss.total.detach(), expected, rtol=1e-5)
    assert not torch.allclose(teacher[2], target[0])  # the swap mattered


def test_the_draws_come_in_the_recorded_order(model):
    """The losses the trainer's step computed before it moved here, on this batch (the draws'
    order, the teacher's subset and the loss must not change: resume is bit-exact)."""
    cases = {
        "masked prior": ({}, (False,) * 4, 1.0),
        "prior prediction, dropout, noise gate": (
            {
                "mask": {
                    "enabled": True,
                    "unmasked_probability": 0.5,
                    "normalize_per_sample": True,
                },
                "prior": {"weight": 1.0, "noise_min": 0.3},
            },
            (False, False, True, False),
            0.5,
        ),
    }
    got = {}
    for name, (sections, prior_prediction, prior_weight) in cases.items():
        batch = make_batch(model, prior_prediction)
        parts = make_parts(model, **sections)
        with torch.no_grad():
            first = train_step(batch, parts, prior_weight)
            second = train_step(batch, parts, prior_weight)  # the generators moved on
        got[name] = [
            [float(getattr(r.loss, key)) for key in ("total", "target", "prior")]
            + [r.teacher_fraction]
            for r in (first, second)
        ]
    for name, expected in RECORDED.items():
        for row, want in zip(got[name], expected, strict=True):
            # The rounding of another thread count or CPU (the prior term, a difference of two
            # near-equal predictions, moved 6e-6 relative between 1 and 2 threads); a draw out
            # of order moves every term by far more.
            assert row == pytest.approx(want, rel=1e-4, abs=1e-9), name


def test_two_processes_shares_add_up_to_the_one_process_loss(model):
    """Each process runs its share; the parts of the loss sum to the whole batch's."""
    batch = make_batch(model, prior_prediction=(False, False, True, False))
    sections = {"mask": {"enabled": True, "normalize_per_sample": True}}
    with torch.no_grad():
        whole = train_step(batch, make_parts(model, **sections), 1.0)
        parts = [
            train_step(batch, make_parts(model, processes=Processes(i, 2), **sections), 1.0)
            for i in range(2)
        ]
    for key in ("total", "target", "prior"):
        summed = sum(float(getattr(p.loss, key)) for p in parts)
        assert summed == pytest.approx(float(getattr(whole.loss, key)), rel=1e-5)
    assert [p.teacher_fraction for p in parts] == [whole.teacher_fraction] * 2


def test_a_batch_smaller_than_the_processes_is_repeated_on_each(model):
    batch = take(make_batch(model), torch.tensor([1]))
    with torch.no_grad():
        whole = train_step(batch, make_parts(model), 1.0)
        parts = [
            train_step(batch, make_parts(model, processes=Processes(i, 2)), 1.0) for i in (0, 1)
        ]
    # Both processes hold the one sample (with its draws): each half of the whole loss.
    for part in parts:
        assert float(part.loss.total) == pytest.approx(float(whole.loss.total) / 2, rel=1e-5)


RECORDED = {
    # [total, target, prior, teacher_fraction] of two steps in a row
    "masked prior": [
        [1.8203649520874023, 1.8200842142105103, 0.00028078327886760235, 0.5],
        [1.5972496271133423, 1.5972391366958618, 1.0512412700336426e-05, 0.5],
    ],
    "prior prediction, dropout, noise gate": [
        [1.8193986415863037, 1.8193986415863037, 0.0, 0.25],
        [1.474883794784546, 1.4748800992965698, 3.7547695228568045e-06, 0.5],
    ],
}
