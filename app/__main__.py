"""``python -m app [PRESET]``: open the desktop application, optionally with a preset."""

from __future__ import annotations

import argparse
from pathlib import Path

import customtkinter as ctk


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app", description="MaskPrior Trainer")
    parser.add_argument("preset", nargs="?", type=Path, help="preset JSON file to open")
    args = parser.parse_args(argv)
    ctk.set_appearance_mode("dark")
    ctk.set_default_color_theme("blue")
    from app.main_window import MainWindow

    window = MainWindow(preset=args.preset)
    window.mainloop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
