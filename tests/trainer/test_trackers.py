"""output.log_with: the metrics.jsonl numbers, the drift readings and the samples reach
TensorBoard's event files (read back with TensorBoard's own reader); a missing package is named;
a tracker that fails, at the start, mid-run or when closing, never hangs the run nor keeps its
folder locked."""

from __future__ import annotations

import errno
import json
import queue
import sys
import threading

import pytest
import torch.utils
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from modules.config import ConfigError
from modules.trainer import Finished, GenericTrainer, StatusMessage
from modules.trainer.preflight import preflight
from modules.trainer.run_folder import RunLock
from tests.trainer.test_generic_trainer import make_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    from modules.demo.dataset import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("demo-data"), size=64).root


def test_tensorboard_gets_the_metrics_the_drift_and_the_samples(demo_root, tmp_path):
    config = make_config(
        demo_root,
        tmp_path,
        output={"log_with": "tensorboard"},
        training={"steps": 3},
        sampling={"prompts": ["a sks heart"], "every": 3, "steps": 2},
        drift={"every": 3, "subject_path": str(demo_root / "heldout-subject"), "max_images": 2},
    )
    finished = GenericTrainer(config).run()
    assert finished.error is None, finished.error
    logs = tmp_path / "run" / "logs" / "lora"
    events = EventAccumulator(str(logs), size_guidance={"scalars": 0, "images": 0}).Reload()
    tags = events.Tags()
    for tag in ("loss_total", "loss_target", "loss_prior", "lr", "drift_background"):
        assert tag in tags["scalars"], tags["scalars"]
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    logged = {e.step: e.value for e in events.Scalars("loss_total")}
    assert logged == pytest.approx({r["step"]: r["loss_total"] for r in rows if "loss_total" in r})
    drift = {e.step: e.value for e in events.Scalars("drift_background")}
    assert sorted(drift) == [0, 3]  # the baseline reading and the last step's
    assert {"samples/0-lora", "samples/0-pair"} <= set(tags["images"])


def test_a_missing_tracker_package_is_named_before_anything_loads(demo_root, tmp_path):
    config = make_config(demo_root, tmp_path, output={"log_with": "tensorboard"})
    preflight(config, create_run_dir=False)  # tensorboard is installed: no problem
    try:
        import wandb  # noqa: F401
    except ImportError:
        config.output.log_with = "wandb"
        with pytest.raises(ConfigError, match=r"output.log_with=wandb: .*pip install wandb"):
            preflight(config, create_run_dir=False)


def run_to_the_end(config, seconds=300):
    """The run in a thread, as the CLI and the UI run it: its events, the last of which must be
    ``Finished`` (they wait for it; a thread that dies without it hung them)."""
    events: queue.Queue = queue.Queue()
    thread = threading.Thread(target=GenericTrainer(config, events).run, daemon=True)
    thread.start()
    thread.join(seconds)
    drained = []
    while not events.empty():
        drained.append(events.get())
    assert drained and isinstance(drained[-1], Finished), "the run ended without Finished"
    return drained[-1], [e.text for e in drained if isinstance(e, StatusMessage)]


def assert_unlocked(run_dir):
    lock = RunLock(run_dir)
    lock.acquire()  # a ConfigError if the run still held it
    lock.release()


def test_a_logs_file_ends_the_run_with_its_name_and_frees_the_folder(demo_root, tmp_path):
    config = make_config(demo_root, tmp_path, output={"log_with": "tensorboard"})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "logs").write_text("a file where TensorBoard's folder goes")
    finished, _ = run_to_the_end(config)
    assert finished.error_kind == "config" and finished.lora_path is None
    assert str(run_dir / "logs") in finished.error, finished.error
    assert "output.log_with=none" in finished.error
    assert_unlocked(run_dir)


def test_a_tensorboard_that_fails_to_import_is_named_with_the_fix(demo_root, tmp_path, monkeypatch):
    # As a broken installation does: the import accelerate's TensorBoard tracker makes fails
    # (and so does its fallback, tensorboardX, not installed), after the preflight found it.
    monkeypatch.delattr(torch.utils, "tensorboard", raising=False)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    config = make_config(demo_root, tmp_path, output={"log_with": "tensorboard"})
    finished, _ = run_to_the_end(config)
    assert finished.error_kind == "config", finished.error
    assert finished.error.startswith(
        "output.log_with=tensorboard: TensorBoard could not start (ModuleNotFoundError: "
        "import of torch.utils.tensorboard halted"
    ), finished.error
    assert finished.error.endswith("set output.log_with=none to train without it")
    assert_unlocked(tmp_path / "run")


@pytest.mark.parametrize("failing", ["add_scalar", "close"])
def test_tensorboard_failing_mid_run_or_closing_is_said_and_the_lora_saved(
    demo_root, tmp_path, monkeypatch, failing
):
    """A full disk under the event files: mid-run (from step 2) or when the writer closes."""
    real = getattr(SummaryWriter, failing)

    def full_disk(self, *args, **kwargs):
        # Not the writer of the hyperparameters, which TensorBoard closes at the start.
        closing = failing == "close" and self.log_dir == str(tmp_path / "run" / "logs" / "lora")
        if closing or kwargs.get("global_step") == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SummaryWriter, failing, full_disk)
    config = make_config(
        demo_root, tmp_path, output={"log_with": "tensorboard"}, training={"steps": 3}
    )
    finished, lines = run_to_the_end(config)
    assert finished.error is None, finished.error
    assert finished.lora_path == tmp_path / "run" / "lora.safetensors" and finished.step == 3
    warnings = [line for line in lines if "TensorBoard" in line]
    if failing == "close":
        assert warnings == [
            "warning: TensorBoard could not close its logs (OSError: [Errno 28] No space left "
            "on device); its last values may be missing there (metrics.jsonl has them all)"
        ]
    else:
        assert len(warnings) == 1 and warnings[0].startswith(
            "warning: TensorBoard failed at step 2 (OSError: [Errno 28] No space left on "
            "device): training goes on without it"
        ), warnings
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(row)["step"] for row in rows] == [1, 2, 3]
    assert_unlocked(tmp_path / "run")
