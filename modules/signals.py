"""The signals that ask a run to end, and how messages name them (the CLI and the UI alike)."""

from __future__ import annotations

import signal

POLITE_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)
"""Signals that ask a process to end: Ctrl-C, a job scheduler or container stop, a closed
terminal. The first stops after the current step and saves the LoRA."""


def signal_name(signum: int) -> str:
    """How a message names a signal: Ctrl-C for SIGINT, else its name."""
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
