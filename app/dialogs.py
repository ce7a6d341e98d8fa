"""Every modal question the UI asks, in one place, so tests can answer them.

Tests replace these functions (``monkeypatch.setattr(dialogs, "ask_yes_no", ...)``); the UI
calls them through the module (``dialogs.ask_yes_no``) so the replacement is seen.
"""

from __future__ import annotations

import tkinter as tk
from pathlib import Path
from tkinter import filedialog, messagebox

import customtkinter as ctk


def show_error(parent: tk.Misc, title: str, message: str) -> None:
    messagebox.showerror(title, message, parent=parent)


def ask_yes_no(parent: tk.Misc, title: str, message: str) -> bool:
    return bool(messagebox.askyesno(title, message, parent=parent))


def ask_yes_no_cancel(parent: tk.Misc, title: str, message: str) -> bool | None:
    """True (yes), False (no) or None (cancel: the window or Escape closed too)."""
    answer = messagebox.askyesnocancel(title, message, parent=parent)
    return None if answer is None else bool(answer)


def ask_text(parent: tk.Misc, title: str, prompt: str) -> str | None:
    answer = ctk.CTkInputDialog(title=title, text=prompt).get_input()
    return answer.strip() if answer and answer.strip() else None


def ask_open_preset(parent: tk.Misc, folder: Path) -> Path | None:
    name = filedialog.askopenfilename(
        parent=parent,
        title="Load preset",
        initialdir=str(folder),
        filetypes=[("Presets", "*.json"), ("All files", "*")],
    )
    return Path(name) if name else None


def ask_directory(parent: tk.Misc, title: str) -> Path | None:
    name = filedialog.askdirectory(parent=parent, title=title, mustexist=True)
    return Path(name) if name else None
