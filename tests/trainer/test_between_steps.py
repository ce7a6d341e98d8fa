"""The between-steps parts: a new one is one class added where the parts are made; the loop
calls its hooks in order, a backup keeps its state and a resume gives it back."""

from __future__ import annotations

import json
from typing import Any

import pytest

from modules.trainer import GenericTrainer
from modules.trainer import training_run as training_run_module
from modules.trainer.backups import backups, read_backup
from modules.trainer.between_steps import BetweenSteps, ScheduledBackups
from tests.trainer.test_generic_trainer import demo_root, make_config, run  # noqa: F401

pytestmark = pytest.mark.slow


class StepCounter(BetweenSteps):
    """What an EMA of the LoRA would be: it changes after every step and lives in backups."""

    name = "counter"

    def __init__(self, calls: list[tuple[str, int]]) -> None:
        self.calls = calls
        self.seen = 0

    def start(self, step: int) -> None:
        self.calls.append(("start", step))

    def readings(self, step: int) -> dict[str, float | None]:
        self.calls.append(("readings", step))
        return {"counter_seen": float(self.seen)}

    def after_step(self, step: int) -> None:
        self.calls.append(("after_step", step))
        self.seen += 1

    def state(self) -> dict[str, Any]:
        return {"seen": self.seen}

    def restore(self, state: dict[str, Any]) -> None:
        self.calls.append(("restore", state["seen"]))
        self.seen = state["seen"]


@pytest.fixture
def counters(monkeypatch):
    """Every run built here gets a StepCounter, where a part with a state goes: before the
    backups."""
    made: list[StepCounter] = []
    original = training_run_module.between_steps

    def with_counter(*args, **kwargs):
        made.append(StepCounter([]))
        parts = original(*args, **kwargs)
        at = [type(part) for part in parts].index(ScheduledBackups)
        return [*parts[:at], made[-1], *parts[at:]]  # a backup holds the step's state

    monkeypatch.setattr(training_run_module, "between_steps", with_counter)
    return made


def test_a_new_part_is_called_between_steps_kept_in_backups_and_restored(
    demo_root,  # noqa: F811
    tmp_path,
    counters,
):
    straight = make_config(demo_root, tmp_path, output={"backup_every": 2, "backup_keep": 2})
    finished, _ = run(straight)
    assert finished.error is None
    calls = counters[0].calls
    assert calls[:4] == [("start", 0), ("readings", 1), ("after_step", 1), ("readings", 2)]
    assert [c for c in calls if c[0] == "after_step"] == [("after_step", s) for s in (1, 2, 3, 4)]
    metrics = (tmp_path / "run/metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["counter_seen"] for line in metrics] == [0, 1, 2, 3]
    kept = {folder.name: read_backup(folder)[0]["parts"] for folder in backups(tmp_path / "run")}
    assert kept == {"step000002": {"counter": {"seen": 2}}, "step000004": {"counter": {"seen": 4}}}

    trainer = GenericTrainer(straight, resume=str(tmp_path / "run/backups/step000002"))
    trainer.setup()
    assert counters[1].calls == [("restore", 2)]
    assert counters[1].seen == 2
    names = [type(part).__name__ for part in trainer.built.between_steps]
    assert names == ["ScheduledSaves", "ScheduledSamples", "StepCounter", "ScheduledBackups"]


def test_a_backup_without_a_part_state_has_the_format_it_had(demo_root, tmp_path):  # noqa: F811
    config = make_config(demo_root, tmp_path, training={"steps": 2}, output={"backup_every": 2})
    finished, _ = run(config)
    assert finished.error is None
    (folder,) = backups(tmp_path / "run")
    state, _ = read_backup(folder)
    assert "parts" not in state
