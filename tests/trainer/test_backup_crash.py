"""Backups when things go wrong: a run killed (SIGKILL) in the middle of writing a backup resumes
from the previous one, and a run stopped by a NaN loss leaves a backup of its last whole step."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from modules.config import resolved_config_json
from modules.trainer import GenericTrainer
from modules.trainer.backups import backups
from tests.trained_lora import REPO
from tests.trainer.test_resume import config, demo  # noqa: F401 (the fixture)

pytestmark = pytest.mark.slow

KILLED_MID_WRITE = """
import pathlib, sys, time, torch
written = {"n": 0}
save = torch.save

def save_then_hang(obj, path):
    save(obj, path)
    backup = pathlib.Path(path).name == "state.pt"
    written["n"] += backup
    if backup and written["n"] == 2:  # the second backup: cut it in half, wait to be killed
        data = pathlib.Path(path).read_bytes()
        pathlib.Path(path).write_bytes(data[: len(data) // 2])
        pathlib.Path(sys.argv[2]).write_text("mid-write")
        time.sleep(600)

torch.save = save_then_hang
from modules.cli.main import main
sys.exit(main(["train", sys.argv[1]]))
"""


def cli(*args, script=None):
    """The command line in a process of its own (one thread, so runs compare bitwise)."""
    command = [sys.executable, "-c", script, *args] if script else [sys.executable, "-m"]
    if not script:
        command += ["modules.cli", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)


def preset(demo, root, name, steps):  # noqa: F811
    path = root / f"{name}.json"
    path.write_text(resolved_config_json(config(demo, root, name, steps)))
    return path


def test_a_run_killed_while_writing_a_backup_resumes_from_the_one_before(demo, tmp_path):  # noqa: F811
    killed, marker = preset(demo, tmp_path, "killed", 6), tmp_path / "mid-write"
    run = cli(str(killed), str(marker), script=KILLED_MID_WRITE)
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert run.poll() is None and time.monotonic() < deadline, "the run ended first"
        time.sleep(0.05)
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    folder = tmp_path / "killed" / "backups"
    assert (folder / ".step000004.partial" / "state.pt").is_file()  # half written
    assert [p.name for p in backups(tmp_path / "killed")] == ["step000002"]

    resumed = cli(str(killed), "--resume", "latest")
    straight = cli(str(preset(demo, tmp_path, "straight", 6)))
    out = resumed.communicate(timeout=240)[0]
    assert resumed.returncode == 0 and "step000002 at step 2" in out, out[-2000:]
    assert straight.wait(timeout=240) == 0
    expected = load_file(tmp_path / "straight" / "lora.safetensors")
    found = load_file(tmp_path / "killed" / "lora.safetensors")
    assert all(torch.equal(found[key], value) for key, value in expected.items())
    assert not (folder / ".step000004.partial").exists()
    assert [p.name for p in backups(tmp_path / "killed")] == ["step000004", "step000006"]


def test_a_nan_stop_leaves_a_backup_of_the_last_whole_step(demo, tmp_path, monkeypatch):  # noqa: F811
    original = GenericTrainer._train_step
    calls = {"n": 0}

    def nan_in_step_3(self, batch):
        result = original(self, batch)
        calls["n"] += 1
        if calls["n"] == 5:  # step 3's first batch (2 batches a step)
            nan = result.loss.total * float("nan")
            return replace(result, loss=replace(result.loss, total=nan), own=nan)
        return result

    nan_run = config(demo, tmp_path, "nan", 4)
    output = nan_run.output.model_copy(update={"backup_every": 100})  # none due before the NaN
    nan_run = nan_run.model_copy(update={"output": output})
    monkeypatch.setattr(GenericTrainer, "_train_step", nan_in_step_3)
    finished = GenericTrainer(nan_run).run()
    monkeypatch.undo()
    assert "step 3: the loss is not finite" in finished.error
    assert "A backup of step 2 is in" in finished.error
    assert [p.name for p in backups(tmp_path / "nan")] == ["step000002"]

    # Resumed (the cause gone), it trains as a run that never met the NaN.
    events: queue.Queue = queue.Queue()
    resumed = GenericTrainer(nan_run, events, resume="latest").run()
    assert resumed.error is None, resumed.error
    straight = GenericTrainer(config(demo, tmp_path, "straight", 4)).run()
    expected = load_file(straight.lora_path)
    found = load_file(resumed.lora_path)
    assert all(torch.equal(found[key], value) for key, value in expected.items())
