"""Layout that holds at every screen size: the window's size from the screen it opens on, rows
of controls that wrap instead of running off the edge, panes that scroll when the window is
smaller than what they need, and one-line texts cut to the width they have.

Sizes here are in screen pixels (what ``winfo_*`` reports), unless a name says logical:
customtkinter multiplies the sizes given to its widgets and windows by its scaling factor.
"""

from __future__ import annotations

import tkinter as tk
from dataclasses import dataclass
from typing import Any

import customtkinter as ctk

PREFERRED_SIZE = (1560, 960)
"""The window's size where the screen has room for it (logical pixels)."""
SMALLEST_SIZE = (560, 380)
"""The least the window can be shrunk to, on screens that have that much room."""
SCREEN_MARGIN = (32, 96)
"""Room left on the screen (screen pixels): the window manager's frame and title bar, a
taskbar or dock."""
ELLIPSIS = "…"
WHEEL = ("<MouseWheel>", "<Button-4>", "<Button-5>")


@dataclass(frozen=True)
class WindowSize:
    """Where the window opens and how small it may get, in logical pixels (position in screen
    pixels, as Tk's geometry takes it)."""

    width: int
    height: int
    x: int
    y: int
    min_width: int
    min_height: int

    def geometry(self) -> str:
        return f"{self.width}x{self.height}+{self.x}+{self.y}"


def window_size(screen_width: int, screen_height: int, scaling: float = 1.0) -> WindowSize:
    """The preferred size where the screen holds it, else the screen less its margin; centred.
    ``scaling``: customtkinter's window scaling (logical pixel → screen pixels)."""
    room_width = max(1, screen_width - SCREEN_MARGIN[0])
    room_height = max(1, screen_height - SCREEN_MARGIN[1])
    width = min(PREFERRED_SIZE[0], int(room_width / scaling))
    height = min(PREFERRED_SIZE[1], int(room_height / scaling))
    x = max(0, (screen_width - round(width * scaling)) // 2)
    # A little above the centre: the title bar sits above the window's top.
    y = max(0, (screen_height - round(height * scaling)) // 2 - SCREEN_MARGIN[1] // 4)
    return WindowSize(
        width, height, x, y, min(SMALLEST_SIZE[0], width), min(SMALLEST_SIZE[1], height)
    )


def elide(text: str, font: Any, width: int) -> str:
    """``text`` on one line, cut at a word with "…" to fit ``width`` screen pixels in ``font``
    (a tkinter or customtkinter font: anything with ``measure``)."""
    line = " ".join(text.split())
    if font.measure(line) <= width:
        return line
    words = line.split(" ")

    def cut(count: int) -> str:
        return " ".join(words[:count]).rstrip(",;:.") + ELLIPSIS

    low, high = 0, len(words)  # the most words that fit with the ellipsis: in [low, high)
    while high - low > 1:
        middle = (low + high) // 2
        if font.measure(cut(middle)) <= width:
            low = middle
        else:
            high = middle
    return cut(low) if low else ELLIPSIS


def follow_width(label: ctk.CTkLabel, container: tk.Misc, pad: int = 0) -> None:
    """Wrap ``label``'s text at ``container``'s width (less ``pad`` screen pixels) as the
    container changes size, so a long text takes more lines instead of running off."""

    def wrap(event: tk.Event) -> None:
        logical = label._reverse_widget_scaling(max(40, event.width - pad))
        if abs(logical - float(label.cget("wraplength"))) >= 1:
            label.configure(wraplength=logical)

    tk.Misc.bind(container, "<Configure>", wrap, add="+")


class FlowFrame(ctk.CTkFrame):
    """A row of controls that wraps onto further lines when the frame is too narrow for it, as
    words in a paragraph do, so every control stays in view. Children are created with the
    frame as their master and added in order with :meth:`add`."""

    def __init__(self, master: tk.Misc, gap: int = 8, line_gap: int = 4, **kwargs: Any) -> None:
        kwargs.setdefault("fg_color", "transparent")
        kwargs.setdefault("height", 10)
        super().__init__(master, **kwargs)
        self._gap = round(self._apply_widget_scaling(gap))
        self._line_gap = round(self._apply_widget_scaling(line_gap))
        self._items: list[tuple[tk.Misc, int]] = []
        self._pending: str | None = None
        tk.Misc.bind(self, "<Configure>", self._schedule, add="+")

    def add(self, widget: tk.Misc, space_before: int = 0) -> tk.Misc:
        """Place ``widget`` after the ones added before, ``space_before`` logical pixels more
        than the usual gap away from them (on the same line)."""
        self._items.append((widget, round(self._apply_widget_scaling(space_before))))
        # A child's own size change (a label's new text) can move the ones after it.
        tk.Misc.bind(widget, "<Configure>", self._schedule, add="+")
        self._schedule()
        return widget

    def _schedule(self, _event: tk.Event | None = None) -> None:
        if self._pending is None:
            self._pending = self.after_idle(self.arrange)

    def lines(self) -> list[list[tk.Misc]]:
        """The shown widgets, line by line, as :meth:`arrange` places them."""
        width = self.winfo_width()
        lines: list[list[tk.Misc]] = [[]]
        x = 0
        for widget, space in self._items:
            wide = widget.winfo_reqwidth()
            start = x + (space + self._gap if lines[-1] else 0)
            if lines[-1] and start + wide > width:
                lines.append([])
                start = 0
            lines[-1].append(widget)
            x = start + wide
        return [line for line in lines if line]

    def arrange(self) -> None:
        """Place every child: left to right, a new line when the next one would not fit."""
        self._pending = None
        if not self.winfo_exists():
            return
        spaces = {str(widget): space for widget, space in self._items}
        y = 0
        for line in self.lines():
            high = max(widget.winfo_reqheight() for widget in line)
            x = 0
            for index, widget in enumerate(line):
                if index:
                    x += self._gap + spaces[str(widget)]
                top = y + (high - widget.winfo_reqheight()) // 2
                # Tk's own place, in screen pixels (customtkinter's would scale them again).
                tk.Place.place_configure(widget, x=x, y=top)
                x += widget.winfo_reqwidth()
            y += high + self._line_gap
        height = max(1, y - self._line_gap)
        if height != self.winfo_height():
            tk.Frame.configure(self, height=height)


class FitScrollFrame(ctk.CTkFrame):
    """A pane that fills its place when the place is at least ``minimum`` (logical pixels) and
    scrolls, with scroll bars shown only then, when it is smaller: its content (``inner``) is
    laid out in the larger of the two, so it shrinks down to the minimum and is never cut."""

    def __init__(self, master: tk.Misc, minimum: tuple[int, int], **kwargs: Any) -> None:
        kwargs.setdefault("fg_color", "transparent")
        super().__init__(master, **kwargs)
        self.minimum = minimum
        self.rowconfigure(0, weight=1)
        self.columnconfigure(0, weight=1)
        background = self._apply_appearance_mode(self._detect_color_of_master())
        self._canvas = tk.Canvas(self, highlightthickness=0, borderwidth=0, background=background)
        self._canvas.grid(row=0, column=0, sticky="nsew")
        self.inner = ctk.CTkFrame(self._canvas, fg_color="transparent")
        self._window = self._canvas.create_window(0, 0, window=self.inner, anchor="nw")
        self.vertical = ctk.CTkScrollbar(self, orientation="vertical", command=self._canvas.yview)
        self.horizontal = ctk.CTkScrollbar(
            self, orientation="horizontal", command=self._canvas.xview
        )
        self._canvas.configure(yscrollcommand=self.vertical.set, xscrollcommand=self.horizontal.set)
        # Laid out only while in view: a pane on a hidden tab keeps its content at the size it
        # asks for, so its charts are not redrawn for a size nobody sees.
        for sequence in ("<Configure>", "<Visibility>"):
            self._canvas.bind(sequence, self._fit, add="+")
        for sequence in WHEEL:
            tk.Misc.bind_all(self, sequence, self._scroll, add="+")

    @property
    def scrolls(self) -> tuple[bool, bool]:
        """Whether it scrolls (horizontally, vertically): the place is below the minimum."""
        return bool(self.horizontal.winfo_manager()), bool(self.vertical.winfo_manager())

    def _fit(self, _event: tk.Event | None = None) -> None:
        if not self._canvas.winfo_viewable():
            return
        view_width, view_height = self._canvas.winfo_width(), self._canvas.winfo_height()
        least_width = round(self._apply_widget_scaling(self.minimum[0]))
        least_height = round(self._apply_widget_scaling(self.minimum[1]))
        width, height = max(view_width, least_width), max(view_height, least_height)
        self._canvas.itemconfigure(self._window, width=width, height=height)
        self._canvas.configure(scrollregion=(0, 0, width, height))
        for bar, needed, place in (
            (self.horizontal, width > view_width, {"row": 1, "column": 0, "sticky": "ew"}),
            (self.vertical, height > view_height, {"row": 0, "column": 1, "sticky": "ns"}),
        ):
            if needed and not bar.winfo_manager():
                bar.grid(**place)
            elif not needed and bar.winfo_manager():
                bar.grid_remove()
        if width <= view_width:
            self._canvas.xview_moveto(0)
        if height <= view_height:
            self._canvas.yview_moveto(0)

    def _scroll(self, event: tk.Event) -> None:
        """The mouse wheel over the pane scrolls it (when it scrolls), except over a part that
        has its own use for the wheel: a chart, the mask canvas, a scrolling list inside."""
        if not self.scrolls[1] or not self.winfo_exists():
            return
        widget = event.widget
        if not isinstance(widget, tk.Misc):
            return
        inner = str(self.inner)
        if not str(widget).startswith(inner):
            return
        while widget is not None and str(widget) != inner:
            own = any(widget.bind(sequence) for sequence in WHEEL)
            scrolling = isinstance(widget, tk.Canvas) and widget.cget("yscrollcommand")
            if own or scrolling:
                return
            widget = widget.master
        up = getattr(event, "num", 0) == 4 or getattr(event, "delta", 0) > 0
        self._canvas.yview_scroll(-1 if up else 1, "units")
