"""A polite signal to the desktop application stops the run with the LoRA saved and closes."""

import os
import signal

import pytest

from app.__main__ import close_on_signals
from tests.app.driving import pump
from tests.app.test_run_panel import RUN_TIMEOUT, small_run

pytestmark = [pytest.mark.ui, pytest.mark.slow]


@pytest.fixture
def restore_signals():
    names = ("SIGINT", "SIGTERM", "SIGHUP")
    saved = {name: signal.getsignal(getattr(signal, name)) for name in names}
    yield
    for name, handler in saved.items():
        signal.signal(getattr(signal, name), handler)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_while_training_saves_the_lora_and_closes_without_asking(
    window, answers, tmp_path, restore_signals, sig
):
    run_dir = small_run(window, tmp_path, steps=500)
    panel = window.run_panel
    close_on_signals(window)
    panel.start_button.invoke()
    pump(window, lambda: len(panel.chart_data) >= 1, RUN_TIMEOUT, "the first step")
    os.kill(os.getpid(), sig)
    pump(window, lambda: window.closed, RUN_TIMEOUT, "the window to close")
    assert window.signalled == sig
    assert panel.last_end.stopped and panel.last_end.error is None
    assert (run_dir / "lora.safetensors").is_file()
    assert answers.questions == []  # a signal does not ask
