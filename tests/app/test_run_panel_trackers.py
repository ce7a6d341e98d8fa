"""The Run tab when TensorBoard fails leaves "Training" either way: "Done" with the LoRA saved
and a warning in the log when it fails mid-run, "Failed" with the fix when it cannot start."""

import errno
import sys

import pytest
import torch.utils
from torch.utils.tensorboard import SummaryWriter

from tests.app.driving import settle
from tests.app.test_run_panel import RUN_TIMEOUT, pump, small_run

pytestmark = [pytest.mark.ui, pytest.mark.slow]


def test_tensorboard_failing_mid_run_or_at_the_start_ends_the_run(
    window, answers, tmp_path, monkeypatch
):
    real = SummaryWriter.add_scalar

    def full_disk(self, *args, **kwargs):
        if kwargs.get("global_step") == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SummaryWriter, "add_scalar", full_disk)
    run_dir = small_run(window, tmp_path, steps=3)
    window.form.row("output.log_with").set("tensorboard")
    settle(window)
    panel = window.run_panel
    window.tabs.set("Run")
    panel.start_button.invoke()
    pump(window, lambda: panel.state == "idle", RUN_TIMEOUT, "the run to end")
    assert panel.last_end.error is None and panel.last_end.step == 3
    assert panel.last_end.lora_path == run_dir / "lora.safetensors"
    assert panel.state_label.cget("text") == "Done: 3 steps"
    assert "warning: TensorBoard failed at step 2" in panel.log_text() and not answers.errors

    # A TensorBoard that fails to import (a broken installation): the run cannot start.
    monkeypatch.delattr(torch.utils, "tensorboard", raising=False)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    panel.start_button.invoke()
    pump(window, lambda: panel.state == "idle", RUN_TIMEOUT, "the failing run to end")
    assert panel.state_label.cget("text") == "Failed"
    ((title, message),) = answers.errors
    assert title == "Training failed" and "TensorBoard could not start" in message
    assert "set output.log_with=none" in message
    assert panel.start_button.cget("state") == "normal"
