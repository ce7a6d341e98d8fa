"""The prior levers in a run: the scheduled weight is the one used, and outside the noise range
the teacher does not run and the prior term is zero."""

import json

import pytest
import torch

from modules.trainer import GenericTrainer
from tests.trainer.test_generic_trainer import demo_root, make_config, run  # noqa: F401

pytestmark = pytest.mark.slow


def rows(tmp_path):
    lines = (tmp_path / "run/metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_a_warmup_starts_without_the_teacher_and_reaches_the_weight(demo_root, tmp_path):  # noqa: F811
    config = make_config(
        demo_root,
        tmp_path,
        prior={"weight": 2.0, "schedule": "warmup", "schedule_share": 0.5},
        training={"steps": 5},
    )
    finished, _ = run(config)
    assert finished.error is None
    got = rows(tmp_path)
    assert [r["prior_weight"] for r in got] == pytest.approx([0, 1, 2, 2, 2])
    # At weight 0 no sample needs the teacher: it is skipped and the prior term is 0.
    assert got[0]["teacher_fraction"] == 0 and got[0]["loss_prior"] == 0
    assert all(r["teacher_fraction"] == 1 and r["loss_prior"] > 0 for r in got[1:])


def test_the_schedule_follows_a_caller_that_takes_the_steps_itself(demo_root, tmp_path):  # noqa: F811
    """A benchmark calls ``optimizer_step`` in its own loop: the step counter, and with it the
    scheduled weight, advance as in a run."""
    config = make_config(
        demo_root,
        tmp_path,
        prior={"weight": 2.0, "schedule": "warmup", "schedule_share": 0.5},
        training={"steps": 5},
    )
    trainer = GenericTrainer(config)
    trainer.setup()
    fractions = [trainer.optimizer_step().teacher_fraction for _ in range(3)]
    assert trainer.step == 3
    assert fractions == [0, 1, 1]
    assert trainer.prior_weight() == 2.0


def test_outside_the_noise_range_the_teacher_is_skipped_and_the_prior_term_is_zero(
    demo_root,  # noqa: F811
    tmp_path,
):
    config = make_config(
        demo_root,
        tmp_path,
        prior={"noise_min": 0.5},
        training={"steps": 6, "batch_size": 4},
    )
    trainer = GenericTrainer(config)
    trainer.setup()
    # The same draws the step makes: which samples' timesteps are in the range.
    state, data = trainer.built.generator.get_state(), trainer.built.batches.state()
    batch = next(trainer.built.batches)
    trainer.built.batches.restore(data)
    torch.randn(batch.latents.shape, generator=trainer.built.generator)
    t = trainer.built.family.sample_timesteps(
        batch.latents.shape, generator=trainer.built.generator, device=trainer.built.device
    )
    trainer.built.generator.set_state(state)
    expected = float((t >= 0.5).float().mean())
    result = trainer.optimizer_step()
    assert result.teacher_fraction == expected

    finished, _ = run(config)
    assert finished.error is None
    got = rows(tmp_path)
    fractions = {r["teacher_fraction"] for r in got}
    assert fractions - {0.0, 1.0}, "some batches hold samples on both sides of the range"
    for row in got[1:]:  # at the first step the LoRA is still the base: no prior loss
        if row["teacher_fraction"] == 0:
            assert row["loss_prior"] == 0
        else:
            assert row["loss_prior"] > 0
