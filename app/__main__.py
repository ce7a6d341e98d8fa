"""``python -m app [PRESET]``: open the desktop application, optionally with a preset."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path
from typing import Any

import customtkinter as ctk

from modules.signals import POLITE_SIGNALS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app", description="MaskPrior Trainer")
    parser.add_argument("preset", nargs="?", type=Path, help="preset JSON file to open")
    args = parser.parse_args(argv)
    ctk.set_appearance_mode("dark")
    ctk.set_default_color_theme("blue")
    from app.main_window import MainWindow

    window = MainWindow(preset=args.preset)
    close_on_signals(window)
    window.mainloop()
    return 128 + window.signalled if window.signalled else 0


def close_on_signals(window: Any) -> None:
    """Ctrl-C in the terminal, SIGTERM (a session or container ending) and SIGHUP (the terminal
    closed) stop a run after its step, save the LoRA and close the window, without asking.

    The handler only schedules the close: Python runs it between the window's own callbacks
    (the run panel polls every few milliseconds), on the Tk thread, where widgets may be used.
    """

    def handler(signum: int, _frame: object) -> None:
        window.after(0, window.close_for_signal, signum)

    for signum in POLITE_SIGNALS:
        signal.signal(signum, handler)


if __name__ == "__main__":
    raise SystemExit(main())
