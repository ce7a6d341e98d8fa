"""The drift meter: exact zero at the start, the mask split, the hand-computed subject loss, and
the trainer, metrics.jsonl and CLI wiring."""

import json

import pytest
import torch

from modules.cli.main import drift_line
from modules.config import ConfigError, config_from_dict
from modules.data.concept import DataError
from modules.data.demo_dataset import write_demo_dataset
from modules.lora import add_lora
from modules.models.demo import DemoFamily, build_demo_model
from modules.trainer import DriftMeasured, GenericTrainer
from modules.trainer.drift import DRIFT_TIMESTEPS, HeldOutSet, measure_drift
from tests.trainer.test_generic_trainer import make_config, run

pytestmark = pytest.mark.slow
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("demo-data"), size=64)


@pytest.fixture()
def model_and_set(demo):
    family, model = DemoFamily(), build_demo_model(seed=3)
    heldout = HeldOutSet.build(
        family,
        model,
        subject_path=str(demo.heldout_subject),
        world_path=str(demo.heldout_world),
        resolution=32,
        seed=0,
        max_images=3,
        device=CPU,
    )
    add_lora(model.denoiser, rank=4, alpha=4, dropout=0.0, target_modules=["to_q", "to_v"])
    return family, model, heldout


def _perturb_lora(model) -> None:
    with torch.no_grad():
        for name, param in model.denoiser.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05, generator=torch.Generator().manual_seed(1))


def test_a_fresh_lora_has_no_drift_and_a_changed_one_has(model_and_set):
    family, model, heldout = model_and_set
    assert heldout.subject.noisy.shape[0] == 3 * len(DRIFT_TIMESTEPS)

    fresh = measure_drift(family, model, heldout)
    assert fresh.drift_background == 0.0 and fresh.drift_world == 0.0
    assert fresh.subject_loss > 0

    _perturb_lora(model)
    changed = measure_drift(family, model, heldout)
    assert changed.drift_background > 0 and changed.drift_world > 0
    assert changed.subject_loss != fresh.subject_loss


def test_subject_loss_and_background_drift_match_a_hand_computation(model_and_set):
    family, model, heldout = model_and_set
    _perturb_lora(model)
    part = heldout.subject
    prediction = family.predict(model, part.noisy, part.timesteps, part.text).detach().float()
    weights = part.weights.expand_as(prediction)
    assert 0 < float((weights == 0).float().mean()) < 1  # both regions are present

    reading = measure_drift(family, model, heldout, batch_size=4)

    loss = ((prediction - part.target) ** 2 * weights).sum() / weights.sum()
    background = weights == 0
    drift = ((prediction - part.base) ** 2)[background].mean()
    assert reading.subject_loss == pytest.approx(float(loss), rel=1e-5)
    assert reading.drift_background == pytest.approx(float(drift), rel=1e-5)
    # A change confined to the subject's cells leaves the background drift alone.
    part.base = torch.where(background, part.base, part.base + 1.0)
    assert measure_drift(family, model, heldout).drift_background == pytest.approx(
        float(drift), rel=1e-5
    )


def test_trainer_measures_on_schedule_and_logs_rows(demo, tmp_path):
    config = make_config(
        demo.root,
        tmp_path,
        training={"steps": 5},
        drift={"every": 2, "subject_path": str(demo.heldout_subject), "max_images": 2},
    )
    finished, events = run(config)
    assert finished.error is None
    readings = [e for e in events if isinstance(e, DriftMeasured)]
    assert [e.step for e in readings] == [0, 2, 4, 5]
    assert readings[0].drift_background == 0.0 and readings[-1].drift_background > 0
    assert all(e.drift_world is None for e in readings)
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    drift_rows = [r for r in rows if r.get("kind") == "drift"]
    assert [r["step"] for r in drift_rows] == [0, 2, 4, 5]
    assert [r["step"] for r in rows if "kind" not in r] == [1, 2, 3, 4, 5]


def test_cli_line_names_each_part():
    event = DriftMeasured(
        step=100, subject_loss=0.1234, drift_background=1.23e-3, drift_world=None, seconds=0.5
    )
    assert (
        drift_line(event) == "drift @ step 100: background 1.23e-03, held-out subject loss 0.1234"
    )


def test_drift_needs_a_folder_and_a_real_one(demo, tmp_path):
    with pytest.raises(ConfigError, match="drift.every: the drift meter needs"):
        config_from_dict({"drift": {"every": 10}})
    config = make_config(
        demo.root, tmp_path, drift={"every": 1, "world_path": str(tmp_path / "missing")}
    )
    with pytest.raises(DataError, match="drift.world_path: folder .*missing' not found"):
        GenericTrainer(config).setup()
