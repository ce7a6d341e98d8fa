"""Training from the real window: charts fill, Stop saves the LoRA, errors are shown, closing
while training stops cleanly."""

import json
from pathlib import Path

import pytest

from app.user_store import UserStore
from tests.app.driving import pump, settle

pytestmark = [pytest.mark.ui, pytest.mark.slow]

RUN_TIMEOUT = 240


def small_run(window, tmp_path: Path, steps: int = 40, name: str = "run") -> Path:
    """The demo-prior preset, shrunk so a run takes seconds on a CPU."""
    window.choose_preset("demo-prior (built-in)")
    run_dir = tmp_path / name
    values = {
        "training.steps": steps,
        "data.resolution": 32,
        "data.cache_dir": str(tmp_path / "cache"),
        "output.run_dir": str(run_dir),
        "sampling.every": 0,
    }
    for path, value in values.items():
        window.form.row(path).set(value)
    settle(window)
    assert window.run_panel.start_button.cget("state") == "normal", window.form.validation
    return run_dir


def test_start_see_points_arrive_stop_and_find_the_lora(window, tmp_path, home):
    run_dir = small_run(window, tmp_path)
    panel = window.run_panel
    window.tabs.set("Run")
    panel.start_button.invoke()
    assert panel.state == "running"
    assert panel.start_button.cget("state") == "disabled"
    pump(window, lambda: len(panel.chart_data) >= 3, RUN_TIMEOUT, "three chart points")
    assert panel.chart_data.steps[:3] == [1, 2, 3]
    assert all(v > 0 for v in panel.chart_data.values["loss_target"])
    assert panel.chart_data.values["teacher_fraction"][0] == 1.0
    progress = panel.progress_text.cget("text")
    assert "step " in progress and "it/s" in progress
    panel.save_button.invoke()
    pump(window, lambda: panel.last_saved is not None, RUN_TIMEOUT, "Save now")
    assert panel.last_saved.is_file()
    panel.sample_button.invoke()
    pump(window, lambda: len(panel.samples) == 6, RUN_TIMEOUT, "Sample now (3 prompts × 2)")
    assert all(path.is_file() for path in panel.samples.values())
    assert panel.samples_title.cget("text").startswith("Latest samples (step ")
    panel.stop_button.invoke()
    pump(window, lambda: panel.state == "idle", RUN_TIMEOUT, "the run to stop")
    end = panel.last_end
    assert end.error is None and end.stopped and end.step < 40
    assert end.lora_path == run_dir / "lora.safetensors" and end.lora_path.is_file()
    assert panel.last_saved == end.lora_path
    log = panel.log_text()
    assert "MASKED PRIOR PRESERVATION TRAINING ENABLED" in log
    assert f"Stopped at step {end.step}" in log
    # The chart holds every step the trainer wrote.
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "loss_total" in row]  # not the drift meter's own rows
    assert len(panel.chart_data) == len(steps) == end.step
    plotted = panel.charts.smooth_lines["loss_total"].get_xdata()
    assert list(plotted) == list(range(1, end.step + 1))
    # Starting saved the config as the last used one.
    assert UserStore(home).load_last_used().training.steps == 40


def test_a_trainer_error_is_shown_and_the_ui_can_start_again(window, answers, tmp_path):
    small_run(window, tmp_path, steps=3)
    panel = window.run_panel
    window.form.row("data.concepts.0.path").set(str(tmp_path / "missing"))
    settle(window)
    panel.start_button.invoke()
    pump(window, lambda: panel.state == "idle", RUN_TIMEOUT, "the failing run to end")
    ((title, message),) = answers.errors
    assert title == "Training failed" and "does not exist" in message
    assert "Training failed:" in panel.log_text() and "does not exist" in panel.log_text()
    assert panel.start_button.cget("state") == "normal"

    window.form.row("data.concepts.0.path").set("demo-data/subject")
    settle(window)
    panel.start_button.invoke()
    pump(window, lambda: panel.state == "idle", RUN_TIMEOUT, "the second run to finish")
    assert panel.last_end.error is None and panel.last_end.step == 3
    assert len(panel.chart_data) == 3 and len(answers.errors) == 1


def test_closing_while_training_asks_then_stops_with_the_lora_saved(window, answers, tmp_path):
    run_dir = small_run(window, tmp_path, steps=200)
    panel = window.run_panel
    panel.start_button.invoke()
    pump(window, lambda: len(panel.chart_data) >= 1, RUN_TIMEOUT, "the first step")
    answers.yes = False
    window.close()
    assert len(answers.questions) == 1 and "Training is running" in answers.questions[0]
    settle(window)
    assert panel.state == "running" and not window.closed
    answers.yes = True
    window.close()
    assert panel.state == "stopping"
    pump(window, lambda: window.closed, RUN_TIMEOUT, "the window to close")
    assert panel.last_end.stopped and panel.last_end.error is None
    assert (run_dir / "lora.safetensors").is_file()
    assert len(answers.questions) == 2


def test_resume_lists_the_run_folder_s_backups_and_continues_from_one(window, tmp_path, home):
    run_dir = small_run(window, tmp_path, steps=4)
    window.form.row("output.backup_every").set(2)
    settle(window)
    panel = window.run_panel
    assert panel.resume_button.cget("state") == "disabled"  # no backup yet
    panel.start_button.invoke()
    pump(window, lambda: panel.state == "idle", RUN_TIMEOUT, "the first run")
    assert panel.last_end.error is None
    assert panel.backup_menu.cget("values") == ["step000002", "step000004"]
    assert panel.backup_menu.get() == "step000004"
    first = {row["step"]: row for row in read_rows(run_dir)}
    window.form.row("training.steps").set(6)
    settle(window)
    assert panel.resume_button.cget("state") == "normal"
    panel.backup_menu.set("step000002")  # steps 3 and 4 are trained again
    panel.resume_button.invoke()
    pump(window, lambda: panel.state == "idle", RUN_TIMEOUT, "the resumed run")
    assert panel.last_end.error is None and panel.last_end.step == 6
    assert "Resuming from" in panel.log_text()
    rows = read_rows(run_dir)
    assert [row["step"] for row in rows if row["step"]] == [1, 2, 3, 4, 5, 6]
    # The charts show the run from step 1: steps 1-2 from before the resume, then the new ones.
    assert panel.chart_data.steps == [1, 2, 3, 4, 5, 6]
    losses = panel.chart_data.values["loss_total"]
    assert losses[:2] == [first[1]["loss_total"], first[2]["loss_total"]]
    assert losses == [row["loss_total"] for row in rows if "loss_total" in row]


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
