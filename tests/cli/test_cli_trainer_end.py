"""`train` waits for the trainer's Finished event: should the trainer thread ever die without
it, the command says so and exits 1 instead of waiting forever."""

import signal
import threading

from modules.cli.main import EXIT_TRAINING_ERROR, train
from modules.config import TrainConfig
from modules.trainer import GenericTrainer


def test_a_trainer_thread_that_dies_without_its_end_is_reported(monkeypatch, tmp_path, capsys):
    def dies(_self):
        raise RuntimeError("the trainer thread dies before its Finished event")

    def waits_too_long(_signum, _frame):
        raise TimeoutError("train() still waits for a trainer thread that is gone")

    monkeypatch.setattr(GenericTrainer, "run", dies)
    died: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: died.append(args.exc_value))
    config = TrainConfig(
        data={"concepts": [{"path": str(tmp_path / "images")}], "cache_dir": str(tmp_path)},
        output={"run_dir": str(tmp_path / "run")},
    )
    previous = signal.signal(signal.SIGALRM, waits_too_long)
    signal.alarm(60)
    try:
        code = train(config)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert code == EXIT_TRAINING_ERROR and len(died) == 1
    error = capsys.readouterr().err
    assert "error: the trainer stopped without reporting its end (see above)" in error
