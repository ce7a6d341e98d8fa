"""The drift meter's chart on the Run tab: readings drawn as they arrive from the trainer's
queue, parts not measured skipped, the hint when the meter is off, a fresh chart per run."""

import queue
from types import SimpleNamespace

import pytest

from app.charts import DRIFT_OFF_HINT, DriftData
from modules.demo.dataset import write_demo_dataset
from modules.trainer.events import DriftBand, DriftMeasured, Finished
from tests.app.driving import pump, settle

pytestmark = pytest.mark.ui

RUN_TIMEOUT = 240
READINGS = [
    DriftMeasured(step=0, subject_loss=0.5, drift_background=0.0, drift_world=0.0, seconds=0.1),
    DriftMeasured(step=10, subject_loss=0.4, drift_background=1e-3, drift_world=None, seconds=0.1),
    DriftMeasured(step=20, subject_loss=None, drift_background=3e-3, drift_world=2e-4, seconds=0.1),
]


def plotted(panel, key: str) -> tuple[list[float], list[float]]:
    line = panel.drift_charts.lines[key]
    return list(line.get_xdata()), list(line.get_ydata())


def set_fields(window, values: dict) -> None:
    for path, value in values.items():
        window.form.row(path).set(value)
    settle(window)


def fake_trainer_start(panel, monkeypatch) -> list:
    """Starting hands the config to a trainer that runs nothing: the test plays its part by
    putting events on the queue (fresh per run, as the real one does)."""
    started = []

    def start(config, resume=None) -> None:
        panel.trainer.events = queue.Queue()
        panel.trainer._ended = False
        started.append(config)

    monkeypatch.setattr(panel.trainer, "start", start)
    return started


def test_drift_data_keeps_a_point_per_measured_part():
    data = DriftData()
    for reading in READINGS:
        data.add(reading)
    assert len(data) == 3
    assert data.steps["drift_background"] == [0, 10, 20]
    assert data.values["drift_background"] == [0.0, 1e-3, 3e-3]
    assert data.steps["drift_world"] == [0, 20] and data.values["drift_world"] == [0.0, 2e-4]
    assert data.steps["subject_loss"] == [0, 10] and data.values["subject_loss"] == [0.5, 0.4]
    data.clear()
    assert len(data) == 0 and data.steps["subject_loss"] == [] and data.values["drift_world"] == []
    data.add(SimpleNamespace(step=5, subject_loss=None, drift_background=None, drift_world=None))
    assert len(data) == 1 and all(steps == [] for steps in data.steps.values())


def test_the_chart_shows_the_clean_image_averages_when_a_reading_has_them():
    """The velocity-space averages are outweighed by the lowest noise level; the chart draws
    the clean-image ones, where every level weighs by what it does to the picture."""
    data = DriftData()
    clean = DriftBand(None, subject_loss=0.02, drift_background=2e-4, drift_world=None)
    data.add(DriftMeasured(7, 0.5, 1e-2, 3e-2, 0.1, clean=clean, bands=(clean,)))
    assert data.values["subject_loss"] == [0.02] and data.values["drift_background"] == [2e-4]
    assert data.values["drift_world"] == []


def test_readings_from_the_queue_are_drawn_skipping_none_and_zero_drift(window):
    panel = window.run_panel
    for reading in READINGS:
        panel.trainer.events.put(reading)
    panel.drain()
    assert len(panel.drift_data) == 3
    # Drift is on a log axis: the untrained baseline (exactly 0) has no point there.
    assert plotted(panel, "drift_background") == ([10, 20], [1e-3, 3e-3])
    assert plotted(panel, "drift_world") == ([20], [2e-4])
    assert plotted(panel, "subject_loss") == ([0, 10], [0.5, 0.4])
    charts = panel.drift_charts
    low, high = charts.drift_axes.get_ylim()
    assert low <= 2e-4 and high >= 3e-3
    low, high = charts.subject_axes.get_ylim()
    assert low < 0.4 and high > 0.5
    assert charts.drift_axes.get_xlim()[1] >= 20
    assert not charts.hint_shown
    log = panel.log_text()
    assert "drift @ step 10: background 1.00e-03, held-out subject loss 0.4000" in log
    assert "drift @ step 20: background 3.00e-03, world 2.00e-04" in log


def test_the_hint_follows_drift_every_and_a_new_run_starts_an_empty_chart(
    window, tmp_path, monkeypatch
):
    panel = window.run_panel
    started = fake_trainer_start(panel, monkeypatch)
    window.choose_preset("demo-prior (built-in)")
    set_fields(window, {"output.run_dir": str(tmp_path / "run"), "drift.every": 0})
    assert panel.drift_charts.hint_shown
    assert panel.drift_charts.hint.cget("text") == DRIFT_OFF_HINT
    set_fields(window, {"drift.every": 10, "drift.subject_path": str(tmp_path)})
    assert not panel.drift_charts.hint_shown

    panel.start_button.invoke()
    assert panel.state == "running" and started[-1].drift.every == 10
    # The step axis spans the whole run from its start.
    assert panel.drift_charts.drift_axes.get_xlim()[1] >= started[-1].training.steps
    for reading in READINGS:
        panel.trainer.events.put(reading)
    pump(window, lambda: len(panel.drift_data) == 3, 10, "the drift readings")
    panel.trainer.events.put(Finished(step=20, lora_path=None))
    pump(window, lambda: panel.state == "idle", 10, "the run to end")
    assert plotted(panel, "subject_loss") == ([0, 10], [0.5, 0.4])
    # Editing the config after a run keeps its readings (and no hint over them) in view.
    set_fields(window, {"drift.every": 0})
    assert len(panel.drift_data) == 3 and not panel.drift_charts.hint_shown

    panel.start_button.invoke()
    assert panel.state == "running" and len(started) == 2
    assert len(panel.drift_data) == 0
    assert all(plotted(panel, key) == ([], []) for key in panel.drift_charts.lines)
    assert panel.drift_charts.hint_shown
    panel.trainer.events.put(Finished(step=0, lora_path=None, stopped=True))
    pump(window, lambda: panel.state == "idle", 10, "the second run to end")


@pytest.mark.slow
def test_a_real_run_with_the_drift_meter_on_fills_the_chart(window, tmp_path):
    demo = write_demo_dataset(tmp_path / "demo", size=64)
    window.choose_preset("demo-prior (built-in)")
    set_fields(
        window,
        {
            "training.steps": 6,
            "data.resolution": 32,
            "data.cache_dir": str(tmp_path / "cache"),
            "output.run_dir": str(tmp_path / "run"),
            "sampling.every": 0,
            "drift.every": 3,
            "drift.max_images": 2,
            "drift.subject_path": str(demo.heldout_subject),
            "drift.world_path": str(demo.heldout_world),
        },
    )
    panel = window.run_panel
    assert panel.start_button.cget("state") == "normal", window.form.validation
    panel.start_button.invoke()
    assert not panel.drift_charts.hint_shown
    pump(window, lambda: panel.state == "idle", RUN_TIMEOUT, "the run to finish")
    assert panel.last_end.error is None and panel.last_end.step == 6
    data = panel.drift_data
    # Before the first step, every drift.every steps, and the last step (here a multiple).
    assert len(data) == 3
    for key in ("subject_loss", "drift_background", "drift_world"):
        assert data.steps[key] == [0, 3, 6]
    assert data.values["drift_background"][0] == 0.0 and data.values["drift_world"][0] == 0.0
    assert all(value > 0 for value in data.values["drift_background"][1:])
    assert plotted(panel, "drift_background")[0] == [3, 6]
    assert plotted(panel, "subject_loss")[0] == [0, 3, 6]
    assert "drift @ step 6 (clean-image error): background" in panel.log_text()
    assert "; background by noise 0.25/0.5/0.75: " in panel.log_text()
