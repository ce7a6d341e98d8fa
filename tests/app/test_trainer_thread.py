"""The worker thread and its queues: bounded draining, and an end event whatever happens."""

import threading
import time
from pathlib import Path

import pytest

from app.trainer_thread import TrainerThread, WorkerFailed
from modules.config import TrainConfig
from modules.trainer.events import Command, Finished, StatusMessage


def wait_for_end(trainer: TrainerThread, batch: int = 1000) -> list:
    events, deadline = [], time.monotonic() + 30
    while trainer.running:
        assert time.monotonic() < deadline, "the run did not end"
        events += trainer.poll(batch)
        time.sleep(0.01)
    return events


def test_poll_drains_in_bounded_batches_in_order(monkeypatch):
    release = threading.Event()

    def work(_config, events, _commands, _resume=None):
        for index in range(250):
            events.put(StatusMessage(f"line {index}"))
        release.wait(10)
        events.put(Finished(step=0, lora_path=None))

    monkeypatch.setattr(TrainerThread, "_work", staticmethod(work))
    trainer = TrainerThread()
    trainer.start(TrainConfig())
    time.sleep(0.2)
    first = trainer.poll(100)
    assert len(first) == 100 and first[0].text == "line 0"
    assert trainer.running
    with pytest.raises(RuntimeError, match="already going"):
        trainer.start(TrainConfig())
    release.set()
    rest = wait_for_end(trainer, 100)
    texts = [event.text for event in first + rest[:-1]]
    assert texts == [f"line {index}" for index in range(250)]
    assert isinstance(rest[-1], Finished) and not trainer.running


def test_commands_reach_the_worker(monkeypatch):
    def work(_config, events, commands, _resume=None):
        events.put(StatusMessage(str(commands.get(timeout=10))))
        events.put(Finished(step=0, lora_path=None, stopped=True))

    monkeypatch.setattr(TrainerThread, "_work", staticmethod(work))
    trainer = TrainerThread()
    trainer.start(TrainConfig())
    trainer.request(Command.STOP)
    events = wait_for_end(trainer)
    assert events[0].text == str(Command.STOP)
    trainer.request(Command.STOP)  # after the end: ignored, nothing is queued
    assert trainer.commands.empty()


def test_a_worker_that_dies_without_finishing_is_reported(monkeypatch):
    def work(_config, events, _commands, _resume=None):
        events.put(StatusMessage("about to fail"))
        # Returning without Finished stands for any death of the worker before its last event.

    monkeypatch.setattr(TrainerThread, "_work", staticmethod(work))
    trainer = TrainerThread()
    trainer.start(TrainConfig())
    events = wait_for_end(trainer)
    assert events[0].text == "about to fail"
    assert isinstance(events[-1], WorkerFailed) and "ended unexpectedly" in events[-1].error


def test_a_real_run_that_cannot_start_ends_with_finished(tmp_path: Path):
    config = TrainConfig(
        data={"concepts": [{"path": str(tmp_path / "missing")}], "cache_dir": str(tmp_path)},
        output={"run_dir": str(tmp_path / "run")},
    )
    trainer = TrainerThread()
    trainer.start(config)
    deadline, events = time.monotonic() + 120, []
    while trainer.running and time.monotonic() < deadline:
        events += trainer.poll(50)
        time.sleep(0.05)
    assert isinstance(events[-1], Finished)
    assert "does not exist" in events[-1].error
