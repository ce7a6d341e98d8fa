"""Hover tooltips (customtkinter has none): a borderless window shown after a short delay."""

from __future__ import annotations

import tkinter as tk

import customtkinter as ctk

DELAY_MS = 500
WRAP_PX = 420


class Tooltip:
    def __init__(self, widget: tk.Misc, text: str) -> None:
        self.widget = widget
        self.text = text
        self._pending: str | None = None
        self._window: tk.Toplevel | None = None
        # Tk's own bind on the outer window: customtkinter's bind attaches to a widget's inner
        # parts, and the pointer moving between those would hide and re-show the tooltip.
        for sequence, handler in (
            ("<Enter>", self._schedule),
            ("<Leave>", self._hide),
            ("<ButtonPress>", self._hide),
        ):
            tk.Misc.bind(widget, sequence, handler, add="+")

    def _schedule(self, _event: tk.Event | None = None) -> None:
        self._cancel()
        if self.text:
            self._pending = self.widget.after(DELAY_MS, self._show)

    def _cancel(self) -> None:
        if self._pending is not None:
            self.widget.after_cancel(self._pending)
            self._pending = None

    def _show(self) -> None:
        self._pending = None
        x = self.widget.winfo_rootx() + 12
        y = self.widget.winfo_rooty() + self.widget.winfo_height() + 4
        window = tk.Toplevel(self.widget)
        window.wm_overrideredirect(True)
        window.wm_geometry(f"+{x}+{y}")
        label = ctk.CTkLabel(
            window,
            text=self.text,
            justify="left",
            wraplength=WRAP_PX,
            fg_color=("#ffffe0", "#3a3a3a"),
            corner_radius=4,
            padx=8,
            pady=6,
        )
        label.pack()
        self._window = window

    def _hide(self, _event: tk.Event | None = None) -> None:
        self._cancel()
        if self._window is not None:
            self._window.destroy()
            self._window = None
