"""The Run tab's Resume: the backup menu lists the backups as the trainer writes them (and as
they are when the menu opens), and a resumed run's charts start at step 1, read from the run
folder's metrics.jsonl up to the backup's step. A trainer that runs nothing stands in (the
test puts the real trainer's events on the queue); tests/app/test_run_panel.py resumes a real
run."""

import json
from pathlib import Path

import pytest

from modules.trainer.events import DriftMeasured, Finished, StatusMessage, StepMetrics
from tests.app.driving import pump, settle
from tests.app.test_drift_chart import fake_trainer_start

pytestmark = pytest.mark.ui


def metrics(step: int, loss: float) -> StepMetrics:
    return StepMetrics(
        step=step,
        total_steps=8,
        epoch=1,
        loss_total=loss,
        loss_target=loss / 2,
        loss_prior=loss / 2,
        target_weight_mean=0.4,
        prior_weight_mean=0.6,
        prior_weight=1.0,
        teacher_fraction=1.0,
        lr=1e-4,
        sec_per_step=0.1,
        eta_seconds=1.0,
    )


def write_backup(run_dir: Path, step: int) -> Path:
    folder = run_dir / "backups" / f"step{step:06d}"
    folder.mkdir(parents=True)
    (folder / "state.pt").write_bytes(b"a backup")
    return folder


def open_and_close(menu) -> None:
    """What a click on the closed menu does, then Escape."""
    menu._open_dropdown_menu()
    menu._dropdown_menu.close()


def configure(window, run_dir: Path) -> None:
    window.choose_preset("demo-prior (built-in)")
    for path, value in {"output.run_dir": str(run_dir), "training.steps": 8}.items():
        window.form.row(path).set(value)
    settle(window)


def test_the_backup_menu_lists_backups_as_they_are_written(window, tmp_path, monkeypatch):
    panel = window.run_panel
    fake_trainer_start(panel, monkeypatch)
    run_dir = tmp_path / "run"
    configure(window, run_dir)
    panel.start_button.invoke()
    assert panel.state == "running" and panel.backup_menu.cget("values") == ["no backup"]
    folder = write_backup(run_dir, 2)
    panel.trainer.events.put(StatusMessage(f"Backup: {folder}"))
    pump(window, lambda: "Backup:" in panel.log_text(), 10, "the backup's message")
    assert panel.backup_menu.cget("values") == ["step000002"]
    assert panel.resume_button.cget("state") == "disabled"  # not while running
    panel.trainer.events.put(Finished(step=3, lora_path=None, stopped=True))
    pump(window, lambda: panel.state == "idle", 10, "the run to end")
    assert panel.resume_button.cget("state") == "normal"

    # Written while the menu was closed (by `train` in a terminal): there when it opens, and
    # chosen, as the newest is unless the user chose another.
    write_backup(run_dir, 4)
    open_and_close(panel.backup_menu)
    assert panel.backup_menu.cget("values") == ["step000002", "step000004"]
    assert panel.backup_menu.get() == "step000004"
    panel.backup_menu._dropdown_menu._button_callback("step000002")  # the user's choice
    write_backup(run_dir, 6)
    open_and_close(panel.backup_menu)
    assert panel.backup_menu.cget("values")[-1] == "step000006"
    assert panel.backup_menu.get() == "step000002"


def test_resume_shows_the_run_from_step_1_without_the_discarded_steps(
    window, tmp_path, monkeypatch
):
    panel = window.run_panel
    started = []
    fake_trainer_start(panel, monkeypatch)
    start = panel.trainer.start
    monkeypatch.setattr(
        panel.trainer, "start", lambda config, resume=None: (started.append(resume), start(config))
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rows = [{"step": 0, "heldout_subject_loss": 0.5, "drift_background": 0.0}]
    rows += [{**metrics(step, 1.0 / step).__dict__} for step in range(1, 7)]
    rows[3]["drift_background_clean"] = 2e-4  # a reading at step 3 (its clean-image one)
    lines = [json.dumps(row) for row in rows] + ['{"step": 7, "loss_to']  # killed mid-line
    (run_dir / "metrics.jsonl").write_text("\n".join(lines), encoding="utf-8")
    for step in (2, 4):
        write_backup(run_dir, step)
    configure(window, run_dir)
    panel.backup_menu.set("step000004")
    panel.resume_button.invoke()
    assert started == [str(run_dir / "backups" / "step000004")]
    # Steps 1-4 from the file at once; 5 and 6 were trained after the backup: gone.
    assert panel.chart_data.steps == [1, 2, 3, 4]
    assert panel.chart_data.values["loss_total"] == [1.0, 0.5, 1 / 3, 0.25]
    assert panel.drift_data.steps["subject_loss"] == [0]
    assert panel.drift_data.steps["drift_background"] == [0, 3]
    assert panel.drift_data.values["drift_background"] == [0.0, 2e-4]
    assert list(panel.charts.smooth_lines["loss_total"].get_xdata()) == [1, 2, 3, 4]
    # The resumed steps continue the lines.
    for step in (5, 6):
        panel.trainer.events.put(metrics(step, 0.1))
    panel.trainer.events.put(DriftMeasured(6, 0.4, 3e-4, None, 0.1))
    panel.trainer.events.put(Finished(step=6, lora_path=None, stopped=True))
    pump(window, lambda: panel.state == "idle", 10, "the resumed run to end")
    assert panel.chart_data.steps == [1, 2, 3, 4, 5, 6]
    assert panel.chart_data.values["loss_total"][4:] == [0.1, 0.1]
    assert panel.drift_data.steps["drift_background"] == [0, 3, 6]

    # A new run (not a resume) starts empty charts.
    panel.start_button.invoke()
    assert len(panel.chart_data) == 0 and len(panel.drift_data) == 0
