"""A final save that keeps failing (a full disk): the Run tab lets the user give up on it."""

import errno

import pytest

from tests.app.driving import pump
from tests.app.test_run_panel import RUN_TIMEOUT, small_run

pytestmark = [pytest.mark.ui, pytest.mark.slow]


def test_stop_again_gives_up_a_save_that_keeps_failing(window, answers, tmp_path, monkeypatch):
    from modules.trainer import saving

    def full_disk(denoiser, path, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(saving, "save_lora", full_disk)
    monkeypatch.setattr(saving, "SAVE_RETRY_SECONDS", 0.05)
    run_dir = small_run(window, tmp_path, steps=500)
    panel = window.run_panel
    panel.start_button.invoke()
    pump(window, lambda: len(panel.chart_data) >= 1, RUN_TIMEOUT, "the first step")
    panel.stop_button.invoke()
    assert panel.state == "stopping"
    assert panel.stop_button.cget("text") == "Give up saving"
    assert panel.stop_button.cget("state") == "normal"
    log = lambda: panel.log_view.get("1.0", "end")  # noqa: E731
    pump(window, lambda: "trying again every" in log(), RUN_TIMEOUT, "the save to be retried")
    assert panel.state == "stopping"  # still trying: nothing is lost while the disk is full
    panel.stop_button.invoke()
    pump(window, lambda: panel.state == "idle", RUN_TIMEOUT, "the run to end")
    assert "could not be saved" in panel.last_end.error
    assert not (run_dir / "lora.safetensors").exists()
    assert panel.stop_button.cget("text") == "Stop"
