"""Driving the real window from a test: run its event loop until something holds.

The loop is Tk's own ``mainloop``, as in the app, not a test loop of ``update()`` calls: Tk
serves a call from another thread only while its main thread is in ``mainloop`` (otherwise
the call waits a second, then fails). The trainer thread makes such calls when the garbage
collector happens to run there and frees an image of the window, so a loop of ``update()``
calls would make each of them cost a second."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
POLL_MS = 20


def pump(window: Any, until: Callable[[], bool], timeout: float, what: str) -> None:
    """Run the window's event loop until ``until()`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    if not until():
        _run_until(window, lambda: until() or time.monotonic() > deadline)
    if not until():
        pytest.fail(f"timed out after {timeout} s waiting for {what}")


def settle(window: Any, seconds: float = 0.2) -> None:
    """Let pending idle work (validation, preview) run."""
    deadline = time.monotonic() + seconds
    _run_until(window, lambda: time.monotonic() > deadline)


def _run_until(window: Any, done: Callable[[], bool]) -> None:
    """Tk's ``mainloop`` until ``done()`` holds, checked every ``POLL_MS`` by a timer of the
    Tcl interpreter itself (it outlives the window, which the test may close meanwhile)."""
    app = window.tk
    running = [True]

    def check() -> None:
        if not running[0]:  # a loop that ended without it (no window left): nothing to stop
            return
        if done():
            app.quit()
        else:
            app.createtimerhandler(POLL_MS, check)

    app.createtimerhandler(POLL_MS, check)
    try:
        app.mainloop()  # an exception raised by ``done`` ends the loop and is raised here
    finally:
        running[0] = False
