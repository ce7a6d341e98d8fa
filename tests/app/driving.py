"""Driving the real window from a test: pump its event loop until something holds."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


def pump(window: Any, until: Callable[[], bool], timeout: float, what: str) -> None:
    """Run the window's event loop until ``until()`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        window.update()
        time.sleep(0.02)


def settle(window: Any, seconds: float = 0.2) -> None:
    """Let pending idle work (validation, preview) run."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        window.update()
        time.sleep(0.01)
