"""Signals, a closed output stream and a second run into the same folder, with real processes."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modules.config import ConfigError

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def train_command(tmp_path, run_dir, steps=100000, *extra):
    """The demo-no-prior preset into ``run_dir``, each test with its own cache."""
    return [
        *(sys.executable, "-m", "modules.cli", "train", "presets/demo-no-prior.json"),
        *("--set", f"training.steps={steps}", "--set", f"data.cache_dir={tmp_path / 'cache'}"),
        *("--run-dir", str(run_dir), *extra),
    ]


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_process_left_behind():
    """A failing test must not leave a training process running beside the rest of the suite."""
    yield
    while STARTED:
        process = STARTED.pop()
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def start_training(tmp_path, run_dir):
    process = subprocess.Popen(
        train_command(tmp_path, run_dir),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    STARTED.append(process)
    return process


def wait_for_steps(run_dir, steps=2, timeout=180):
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists():
            rows = [line for line in metrics.read_text().splitlines() if '"loss_total"' in line]
            if len(rows) >= steps:
                return
        time.sleep(0.2)
    raise AssertionError(f"no training steps in {metrics} after {timeout} s")


@pytest.mark.parametrize(
    ("sig", "status"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)]
)
def test_a_polite_signal_stops_after_the_step_and_saves(tmp_path, sig, status):
    run_dir = tmp_path / "run"
    process = start_training(tmp_path, run_dir)
    wait_for_steps(run_dir)
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == status, stderr
    name = "Ctrl-C" if sig == signal.SIGINT else sig.name
    assert f"{name}: stopping after this step and saving the LoRA" in stderr
    assert "stopped at step" in stdout
    lora = run_dir / "lora.safetensors"
    assert lora.is_file() and all(torch.isfinite(t).all() for t in load_file(lora).values())
    assert "Traceback" not in stderr


def test_a_closed_output_stream_does_not_stop_training(tmp_path):
    """As ``train ... | head -1``: the reader goes away after the first line."""
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        train_command(tmp_path, run_dir, 40, "--set", "sampling.every=10"),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    STARTED.append(process)
    process.stdout.readline()
    process.stdout.close()  # the pipe's reader is gone: the next writes get EPIPE
    stderr = process.stderr.read().decode()
    process.wait(timeout=300)
    assert process.returncode == 0, stderr
    assert "BrokenPipe" not in stderr and "Traceback" not in stderr
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(row["step"] for row in rows) == 40
    assert (run_dir / "lora.safetensors").is_file()


def test_a_second_run_into_the_same_folder_is_refused_naming_the_owner(tmp_path):
    run_dir = tmp_path / "run"
    first = start_training(tmp_path, run_dir)
    try:
        wait_for_steps(run_dir)
        second = subprocess.run(
            train_command(tmp_path, run_dir, 5),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert second.returncode == 2, second.stderr
        assert f"'{run_dir}' is in use by another run (process {first.pid}" in second.stderr
        assert second.stderr.count("is in use by another run") == 1
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 143
    assert (run_dir / "lora.safetensors").is_file()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in rows if "loss_total" in row]
    assert steps == list(range(1, len(steps) + 1))  # one run's rows, not two interleaved


def test_a_killed_run_does_not_leave_its_folder_locked(tmp_path):
    from modules.trainer.run_folder import LOCK_NAME, RunLock

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from modules.trainer.run_folder import RunLock; "
            "lock = RunLock(Path(sys.argv[1])); lock.acquire(); print('locked', flush=True); "
            "time.sleep(600)",
            str(tmp_path),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    STARTED.append(holder)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(ConfigError, match=f"process {holder.pid} on "):
        RunLock(tmp_path).acquire()
    holder.kill()  # kill -9: no clean-up code runs
    holder.wait(timeout=30)
    lock = RunLock(tmp_path)
    lock.acquire()
    assert str(holder.pid) not in (tmp_path / LOCK_NAME).read_text()
    lock.release()


def test_sigterm_then_sighup_still_saves(tmp_path):
    """A service manager may send SIGTERM and SIGHUP together: only a second Ctrl-C quits."""
    run_dir = tmp_path / "run"
    process = start_training(tmp_path, run_dir)
    wait_for_steps(run_dir)
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGHUP)
    _, stderr = process.communicate(timeout=120)
    # Pending signals are delivered lowest number first: SIGHUP may be handled before SIGTERM.
    assert process.returncode in (129, 143), stderr
    assert stderr.count("stopping after this step") == 1
    assert stderr.count("already stopping, the LoRA is being saved") == 1
    assert (run_dir / "lora.safetensors").is_file()
