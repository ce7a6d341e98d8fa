"""Signals, a closed output stream and a second run into the same folder, with real processes."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modules.config import ConfigError
from modules.trainer.run_folder import LOCK_NAME, RunLock

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def train_command(tmp_path, run_dir, steps=100000, *extra):
    """The demo-no-prior preset into ``run_dir``, each test with its own cache."""
    return [
        *(sys.executable, "-m", "modules.cli", "train", "presets/demo-no-prior.json"),
        *("--set", f"training.steps={steps}", "--set", f"data.cache_dir={tmp_path / 'cache'}"),
        *("--run-dir", str(run_dir), *extra),
    ]


# Training processes that run together share the cores: one thread each, so that no thread
# waits on another's core.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}

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
        env=ONE_THREAD,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    STARTED.append(process)
    return process


def steps_done(run_dir):
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return 0
    return sum('"loss_total"' in line for line in metrics.read_text().splitlines())


def wait_for_steps(run_dir, steps=2, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if steps_done(run_dir) >= steps:
            return
        time.sleep(0.2)
    raise AssertionError(f"no training steps in {run_dir / 'metrics.jsonl'} after {timeout} s")


def wait_for_owner(run_dir, process, timeout=180):
    """Until ``process`` has written itself into the run folder's lock."""
    lock = run_dir / LOCK_NAME
    deadline = time.monotonic() + timeout
    while f"process {process.pid} " not in (lock.read_text() if lock.exists() else ""):
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, f"{lock} names no process after {timeout} s"
        time.sleep(0.1)


POLITE = [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)]
SIGNALS_SENT = {sig.name: (sig,) for sig, _ in POLITE} | {
    "SIGTERM+SIGHUP": (signal.SIGTERM, signal.SIGHUP)
}


@dataclass(frozen=True)
class Stopped:
    run_dir: Path
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """The runs of the signal tests, by the signals they were sent: one training process each,
    started together so that their start-ups (imports, model, cache) overlap on the cores; each
    is sent its signals as soon as it has trained two steps."""
    root = tmp_path_factory.mktemp("signals")
    processes = {}
    try:
        for name in SIGNALS_SENT:
            (root / name).mkdir()
            with (
                (root / name / "stdout").open("w") as out,
                (root / name / "stderr").open("w") as err,
            ):
                processes[name] = subprocess.Popen(
                    train_command(root / name, root / name / "run"),
                    cwd=REPO,
                    env=ONE_THREAD,
                    stdout=out,
                    stderr=err,
                )
        waiting = set(processes)
        deadline = time.monotonic() + 240
        while waiting:
            for name in sorted(waiting):
                assert processes[name].poll() is None, (root / name / "stderr").read_text()
                if steps_done(root / name / "run") >= 2:
                    for sig in SIGNALS_SENT[name]:
                        processes[name].send_signal(sig)
                    waiting.remove(name)
            assert time.monotonic() < deadline, f"no training steps after 240 s: {waiting}"
            time.sleep(0.2)
        for process in processes.values():
            process.wait(timeout=120)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
    return {
        name: Stopped(
            root / name / "run",
            process.returncode,
            (root / name / "stdout").read_text(),
            (root / name / "stderr").read_text(),
        )
        for name, process in processes.items()
    }


@pytest.mark.parametrize(("sig", "status"), POLITE)
def test_a_polite_signal_stops_after_the_step_and_saves(stopped, sig, status):
    run = stopped[sig.name]
    assert run.returncode == status, run.stderr
    name = "Ctrl-C" if sig == signal.SIGINT else sig.name
    assert f"{name}: stopping after this step and saving the LoRA" in run.stderr
    assert "stopped at step" in run.stdout
    lora = run.run_dir / "lora.safetensors"
    assert lora.is_file() and all(torch.isfinite(t).all() for t in load_file(lora).values())
    assert "Traceback" not in run.stderr


def test_a_closed_output_stream_does_not_stop_training(tmp_path):
    """As ``train ... | head -1``: the reader goes away after the first line; the run goes on
    writing (steps, samples every 4 steps, drift readings) to the end."""
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        train_command(tmp_path, run_dir, 8, "--set", "sampling.every=4"),
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
    assert max(row["step"] for row in rows) == 8
    assert len(list((run_dir / "samples").glob("step000008-*-lora.png"))) == 3
    assert (run_dir / "lora.safetensors").is_file()


def test_a_second_run_into_the_same_folder_is_refused_naming_the_owner(tmp_path):
    run_dir = tmp_path / "run"
    first = start_training(tmp_path, run_dir)
    try:
        # The second starts once the first owns the folder: its start-up overlaps the first's.
        wait_for_owner(run_dir, first)
        second = subprocess.run(
            train_command(tmp_path, run_dir, 5),
            cwd=REPO,
            env=ONE_THREAD,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert second.returncode == 2, second.stderr
        assert f"'{run_dir}' is in use by another run (process {first.pid}" in second.stderr
        assert second.stderr.count("is in use by another run") == 1
        wait_for_steps(run_dir)
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 143
    assert (run_dir / "lora.safetensors").is_file()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in rows if "loss_total" in row]
    assert steps == list(range(1, len(steps) + 1))  # one run's rows, not two interleaved


def test_a_killed_run_does_not_leave_its_folder_locked(tmp_path):
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


def test_sigterm_then_sighup_still_saves(stopped):
    """A service manager may send SIGTERM and SIGHUP together: only a second Ctrl-C quits."""
    run = stopped["SIGTERM+SIGHUP"]
    # Pending signals are delivered lowest number first: SIGHUP may be handled before SIGTERM.
    assert run.returncode in (129, 143), run.stderr
    assert run.stderr.count("stopping after this step") == 1
    assert run.stderr.count("already stopping, the LoRA is being saved") == 1
    assert (run.run_dir / "lora.safetensors").is_file()
