"""The drift meter: exact zero at the start, the mask split, the hand-computed subject loss, and
the trainer, metrics.jsonl and CLI wiring. The held-out folders are written here, small."""

import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from modules.config import ConfigError, config_from_dict
from modules.config.schema import DriftConfig
from modules.demo.dataset import write_demo_dataset
from modules.lora import add_lora
from modules.models.demo.family import DemoFamily, build_demo_model
from modules.trainer import Command, DriftBand, DriftMeasured, GenericTrainer, StepMetrics
from modules.trainer import drift as drift_module
from modules.trainer.drift import DRIFT_TIMESTEPS, DriftMeter, HeldOutSet, measure_drift
from tests.trainer.test_generic_trainer import make_config, run

CPU = torch.device("cpu")
SIZE = 64
"""Held-out images are 64 px; measured at 32 px, an 8 × 8 latent grid (4 px per cell)."""
PAUSE = 1000.0
"""Seconds the clock jumps during a measurement in the timing test: far above any step."""


def write_subject(folder, count=3):
    """Images with a mask: full weight on the 20 left columns, grey 128 on rows 40-47 of the
    rest, 0 elsewhere. At the latent grid (8 × 8 image pixels per cell): columns 0-1 are 1,
    column 2 half 1 and half 0 or grey (a soft edge), row 5 of columns 3-7 grey, the rest 0."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[:, :20] = 255
    mask[40:48, 20:] = 128
    for index in range(count):
        pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(folder / f"s{index}.png")
        Image.fromarray(mask, "L").save(folder / f"s{index}-masklabel.png")
        (folder / f"s{index}.txt").write_text(f"a sks heart, view {index}")
    return folder


def write_world(folder, count=2):
    folder.mkdir(parents=True)
    for index in range(count):
        Image.new("RGB", (SIZE, SIZE), (40 * index, 120, 200)).save(folder / f"w{index}.png")
        (folder / f"w{index}.txt").write_text(f"a blue square, scene {index}")
    return folder


def expected_weights():
    """The mask at the latent grid, by hand (see :func:`write_subject`), as (1, 8, 8)."""
    weights = torch.zeros(1, 8, 8)
    weights[..., :2] = 1.0
    weights[..., 2] = 0.5
    weights[:, 5, 2] = (1 + 128 / 255) / 2
    weights[:, 5, 3:] = 128 / 255
    return weights


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("heldout")
    return write_subject(root / "subject"), write_world(root / "world")


@pytest.fixture()
def model_and_set(folders):
    family, model = DemoFamily(), build_demo_model(seed=3)
    subject, world = folders
    heldout = HeldOutSet.build(
        family,
        model,
        subject_path=str(subject),
        world_path=str(world),
        resolution=32,
        seed=0,
        max_images=8,
        device=CPU,
    )
    add_lora(model.denoiser, rank=4, alpha=4, dropout=0.0, target_modules=["to_q", "to_v"])
    return family, model, heldout


def _perturb_lora(model) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.denoiser.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05, generator=generator)


def test_the_set_holds_one_row_per_image_and_timestep(model_and_set):
    _, _, heldout = model_and_set
    assert heldout.subject.noisy.shape[0] == 3 * len(DRIFT_TIMESTEPS)
    assert heldout.world.noisy.shape[0] == 2 * len(DRIFT_TIMESTEPS)
    assert heldout.subject.timesteps.tolist() == list(DRIFT_TIMESTEPS) * 3
    assert heldout.world.weights is None
    assert DriftConfig().timesteps == list(DRIFT_TIMESTEPS)


def test_the_family_converts_the_noise_fractions_to_its_timesteps(folders):
    """``drift.timesteps`` are noise fractions for every family; each family says which of its
    own timesteps they are (here a family whose timesteps are 1000 t)."""

    class ThousandFamily(DemoFamily):
        def timesteps_from_fractions(self, fractions, shape):
            assert shape[0] == fractions.shape[0] and len(shape) == 4  # (rows, C, h, w)
            return fractions * 1000

        def noisy_input_and_target(self, latents, noise, timesteps):
            return super().noisy_input_and_target(latents, noise, timesteps / 1000)

        def predict(self, model, noisy, timesteps, text):
            return super().predict(model, noisy, timesteps / 1000, text)

    family, model = ThousandFamily(), build_demo_model(seed=3)
    heldout = HeldOutSet.build(
        family,
        model,
        subject_path=str(folders[0]),
        world_path="",
        resolution=32,
        seed=0,
        max_images=8,
        device=CPU,
    )
    assert heldout.subject.timesteps.tolist() == pytest.approx(
        [t * 1000 for t in DRIFT_TIMESTEPS] * 3
    )
    same = HeldOutSet.build(
        DemoFamily(),
        model,
        subject_path=str(folders[0]),
        world_path="",
        resolution=32,
        seed=0,
        max_images=8,
        device=CPU,
    )
    assert torch.allclose(heldout.subject.base, same.subject.base, atol=1e-6)


def test_masks_are_area_averaged_to_the_latent_grid(model_and_set):
    _, _, heldout = model_and_set
    weights = heldout.subject.weights  # (rows, 1, 8, 8)
    for row in weights:
        assert torch.allclose(row, expected_weights(), atol=1e-6)
    # Only cells the mask leaves at exactly 0 are background: not the soft edge column 2.
    background = (weights[0, 0] == 0).nonzero().tolist()
    assert len(background) == 5 * 7 and all(col >= 3 and row != 5 for row, col in background)


def test_a_fresh_lora_has_no_drift_and_a_changed_one_has(model_and_set):
    family, model, heldout = model_and_set
    fresh = measure_drift(family, model, heldout)
    assert fresh.drift_background == 0.0 and fresh.drift_world == 0.0
    assert fresh.subject_loss > 0

    _perturb_lora(model)
    changed = measure_drift(family, model, heldout)
    assert changed.drift_background > 0 and changed.drift_world > 0
    assert changed.subject_loss != fresh.subject_loss
    assert model.denoiser.training  # measuring puts the model back as it found it


def test_subject_loss_and_background_drift_match_a_hand_computation(model_and_set):
    family, model, heldout = model_and_set
    _perturb_lora(model)
    part = heldout.subject
    model.denoiser.eval()
    with torch.no_grad():
        prediction = family.predict(model, part.noisy, part.timesteps, part.text).float()
    model.denoiser.train()

    reading = measure_drift(family, model, heldout, batch_size=4)

    # By hand: the mask's levels at the latent grid weight the squared error of each cell.
    weights = expected_weights().expand(prediction.shape)  # (rows, C, 8, 8)
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


def test_each_noise_level_is_read_alone_and_in_clean_image_space(model_and_set):
    """A velocity error e at noise t is an error t e in the clean image read from it: the bands
    and the clean average weigh each row's squared errors by t^2; the velocity average does not,
    so there its lowest level weighs most."""
    family, model, heldout = model_and_set
    _perturb_lora(model)
    reading = measure_drift(family, model, heldout)
    part = heldout.subject
    model.denoiser.eval()
    with torch.no_grad():
        prediction = family.predict(model, part.noisy, part.timesteps, part.text).float()
    model.denoiser.train()
    weights = expected_weights().expand(prediction.shape)
    background = weights == 0

    assert [band.timestep for band in reading.bands] == list(DRIFT_TIMESTEPS)
    for band in reading.bands:
        rows = part.fractions == band.timestep
        loss = ((prediction - part.target) ** 2 * weights)[rows].sum() / weights[rows].sum()
        drift = ((prediction - part.base) ** 2)[rows][background[rows]].mean()
        t2 = band.timestep**2
        assert band.subject_loss == pytest.approx(t2 * float(loss), rel=1e-5)
        assert band.drift_background == pytest.approx(t2 * float(drift), rel=1e-5)
        assert band.drift_world > 0
    # Every image weighs alike at each level, so the clean average is the bands' mean.
    for key in ("subject_loss", "drift_background", "drift_world"):
        bands = [getattr(band, key) for band in reading.bands]
        assert getattr(reading.clean, key) == pytest.approx(sum(bands) / len(bands), rel=1e-5)
        unscaled = [
            value / band.timestep**2 for value, band in zip(bands, reading.bands, strict=True)
        ]
        assert getattr(reading, key) == pytest.approx(sum(unscaled) / len(unscaled), rel=1e-5)
    assert reading.clean.timestep is None


def test_the_base_is_the_model_without_its_lora_whenever_the_set_is_built(folders):
    """Built after the LoRA is added (and changed), the cached base is still the base model's."""
    family, subject = DemoFamily(), str(folders[0])
    settings = {"world_path": "", "resolution": 32, "seed": 0, "max_images": 2, "device": CPU}
    before = HeldOutSet.build(family, build_demo_model(seed=3), subject_path=subject, **settings)
    model = build_demo_model(seed=3)
    add_lora(model.denoiser, rank=4, alpha=4, dropout=0.0, target_modules=["to_q", "to_v"])
    _perturb_lora(model)
    after = HeldOutSet.build(family, model, subject_path=subject, **settings)
    assert torch.allclose(before.subject.base, after.subject.base, atol=1e-6)
    assert after.world is None
    assert measure_drift(family, model, after).drift_world is None


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    """Training data for the trainer tests (the held-out folders are the ones above)."""
    return write_demo_dataset(tmp_path_factory.mktemp("demo-data"), size=64).root


@pytest.mark.slow
class TestTrainer:
    def test_measures_on_schedule_and_logs_the_keys_in_the_step_rows(
        self, demo_root, folders, tmp_path, monkeypatch
    ):
        clock, real_clock = [0.0], time.perf_counter
        monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + clock[0])

        def slow_measure(*args, **kwargs):
            clock[0] += PAUSE
            return measure_drift(*args, **kwargs)

        monkeypatch.setattr(drift_module, "measure_drift", slow_measure)
        drift = {"every": 2, "subject_path": str(folders[0]), "world_path": str(folders[1])}
        config = make_config(demo_root, tmp_path, training={"steps": 4}, drift=drift)
        finished, events = run(config)
        assert finished.error is None
        readings = [e for e in events if isinstance(e, DriftMeasured)]
        assert [e.step for e in readings] == [0, 2, 4]
        assert readings[0].drift_background == 0.0 and readings[0].drift_world == 0.0
        assert readings[-1].drift_background > 0 and readings[-1].drift_world > 0
        assert all(e.subject_loss > 0 and e.seconds > 0 for e in readings)

        rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
        keys = ("heldout_subject_loss", "drift_background", "drift_world", "drift_seconds")
        # The baseline has a row of its own (no step ran); later readings join their step's row.
        assert rows[0] == {"step": 0, **DriftMeter.row(readings[0])}
        assert dict(zip(keys, _values(readings[0]), strict=True)).items() <= rows[0].items()
        for tail in ("_clean", "_t0.25", "_t0.5", "_t0.75"):
            assert rows[0][f"heldout_subject_loss{tail}"] > 0
            assert rows[0][f"drift_background{tail}"] == 0.0 == rows[0][f"drift_world{tail}"]
        assert rows[-1]["drift_world_t0.75"] == readings[-1].bands[-1].drift_world > 0
        steps = rows[1:]
        assert [r["step"] for r in steps] == [1, 2, 3, 4]
        assert all("loss_total" in r for r in steps)
        assert [all(k in r for k in keys) for r in steps] == [False, True, False, True]
        assert steps[3]["drift_background"] == readings[-1].drift_background
        # The measurement's time is its own, not the step's.
        assert all(r["drift_seconds"] >= PAUSE for r in (rows[0], steps[1], steps[3]))
        assert all(r["sec_per_step"] < PAUSE for r in steps)

    def test_a_stop_between_readings_measures_the_saved_lora(self, demo_root, folders, tmp_path):
        drift = {"every": 100, "subject_path": str(folders[0])}
        config = make_config(demo_root, tmp_path, training={"steps": 50}, drift=drift)
        finished, events = run(config, [Command.STOP])
        assert finished.stopped and finished.step == 1
        readings = [e for e in events if isinstance(e, DriftMeasured)]
        assert [e.step for e in readings] == [0, 1]
        assert all(e.drift_world is None for e in readings)
        rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
        assert [(r["step"], "loss_total" in r) for r in rows] == [(0, False), (1, True), (1, False)]
        assert rows[2]["drift_world"] is None and rows[2]["drift_background"] > 0

    def test_measuring_does_not_change_the_training(self, demo_root, folders, tmp_path):
        plain, _ = run(make_config(demo_root, tmp_path / "a", training={"steps": 3}))
        drift = {"every": 1, "subject_path": str(folders[0])}
        config = make_config(demo_root, tmp_path / "b", training={"steps": 3}, drift=drift)
        measured, events = run(config)
        losses = [e.loss_total for e in events if isinstance(e, StepMetrics)]
        rows = (tmp_path / "a/run/metrics.jsonl").read_text().splitlines()
        assert losses == [json.loads(row)["loss_total"] for row in rows]
        assert plain.error is None and measured.error is None

    def test_a_missing_folder_names_the_field_and_the_path(self, demo_root, tmp_path):
        missing = tmp_path / "missing"
        config = make_config(demo_root, tmp_path, drift={"every": 1, "world_path": str(missing)})
        # Found before the model loads, with the other paths (modules.trainer.preflight).
        with pytest.raises(ConfigError, match="drift.world_path: '.*missing' is not a folder"):
            GenericTrainer(config).setup()


def _values(reading):
    return reading.subject_loss, reading.drift_background, reading.drift_world, reading.seconds


def test_cli_line_names_each_part():
    event = DriftMeasured(
        step=100, subject_loss=0.1234, drift_background=1.23e-3, drift_world=4.56e-4, seconds=0.5
    )
    assert event.line() == (
        "drift @ step 100: background 1.23e-03, world 4.56e-04, held-out subject loss 0.1234"
    )
    no_world = DriftMeasured(100, 0.1234, 1.23e-3, None, 0.5)
    assert no_world.line() == "drift @ step 100: background 1.23e-03, held-out subject loss 0.1234"
    bands = (DriftBand(0.25, 0.01, 1e-4, 2e-4), DriftBand(0.75, 0.03, 3e-4, 4e-4))
    clean = DriftBand(None, 0.02, 2e-4, 3e-4)
    event = DriftMeasured(100, 0.1234, 1.23e-3, 4.56e-4, 0.5, clean=clean, bands=bands)
    assert event.line() == (
        "drift @ step 100 (clean-image error): background 2.00e-04, world 3.00e-04, "
        "held-out subject loss 0.0200; background by noise 0.25/0.75: 1.0e-04/3.0e-04"
    )


def test_drift_needs_a_folder_and_timesteps_inside_0_1():
    with pytest.raises(ConfigError, match="drift.every: the drift meter needs a held-out folder"):
        config_from_dict({"drift": {"every": 10}})
    with pytest.raises(ConfigError, match=r"drift.timesteps: 1.0 not between 0 and 1"):
        config_from_dict({"drift": {"timesteps": [0.5, 1.0]}})
    with pytest.raises(ConfigError, match="drift.timesteps"):
        config_from_dict({"drift": {"timesteps": []}})
    assert config_from_dict({"drift": {"every": 5, "world_path": "w"}}).drift.every == 5
