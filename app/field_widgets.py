"""Widgets built from field specs: a control per field kind, a row per field, a form per section.

The kind of a field (``app.field_specs``) picks its control: bool → switch, Literal → option
menu, number → entry (plus a slider where both bounds are finite and the range is usable),
``X | None`` → the same with an on/off switch, str → entry, list[str] → one item per line,
list[float] → one entry of comma-separated numbers.
Every control reports changes through one callback; the form above it validates the whole
config and hands each field's message back with :meth:`FieldRow.set_error`.
"""

from __future__ import annotations

import tkinter as tk
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import customtkinter as ctk
from pydantic import BaseModel

from app.field_specs import (
    FieldSpec,
    format_number,
    format_numbers,
    parse_number,
    parse_numbers,
    section_specs,
    slider_range,
)
from app.style import ERROR_COLOUR, heading_font
from app.tooltip import Tooltip

OnChange = Callable[[], None]

ENTRY_WIDTH = 110
WIDE_WIDTH = 420
SLIDER_WIDTH = 240


class Control:
    """One field's input widget(s) inside ``self.frame``."""

    def __init__(self, parent: tk.Misc, spec: FieldSpec, on_change: OnChange) -> None:
        self.spec = spec
        self.frame = ctk.CTkFrame(parent, fg_color="transparent")
        self._on_change = on_change

    def get(self) -> Any:
        raise NotImplementedError

    def set(self, value: Any) -> None:
        raise NotImplementedError

    def _changed(self, *_args: object) -> None:
        self._on_change()


class BoolControl(Control):
    def __init__(self, parent: tk.Misc, spec: FieldSpec, on_change: OnChange) -> None:
        super().__init__(parent, spec, on_change)
        self.variable = tk.BooleanVar(master=self.frame, value=bool(spec.default))
        self.switch = ctk.CTkSwitch(
            self.frame, text="", variable=self.variable, onvalue=True, offvalue=False
        )
        self.switch.pack(side="left")
        self.variable.trace_add("write", self._changed)

    def get(self) -> bool:
        return bool(self.variable.get())

    def set(self, value: bool) -> None:
        self.variable.set(bool(value))


class ChoiceControl(Control):
    def __init__(self, parent: tk.Misc, spec: FieldSpec, on_change: OnChange) -> None:
        super().__init__(parent, spec, on_change)
        self.variable = tk.StringVar(master=self.frame, value=str(spec.default or spec.choices[0]))
        self.menu = ctk.CTkOptionMenu(
            self.frame, values=list(spec.choices), variable=self.variable, width=180
        )
        self.menu.pack(side="left")
        self.variable.trace_add("write", self._changed)

    def get(self) -> str:
        return self.variable.get()

    def set(self, value: str) -> None:
        self.variable.set(str(value))

    def offer(self, choices: tuple[str, ...]) -> None:
        """List only ``choices`` in the menu (those of the chosen model family); the current
        value stays even when not among them, so its error shows instead of a silent change."""
        self.menu.configure(values=list(choices))


class TextControl(Control):
    def __init__(self, parent: tk.Misc, spec: FieldSpec, on_change: OnChange) -> None:
        super().__init__(parent, spec, on_change)
        self.variable = tk.StringVar(master=self.frame, value=spec.default or "")
        self.entry = ctk.CTkEntry(self.frame, textvariable=self.variable, width=WIDE_WIDTH)
        self.entry.pack(side="left")
        self.variable.trace_add("write", self._changed)

    def get(self) -> str | None:
        text = self.variable.get()
        return None if self.spec.optional and not text else text

    def set(self, value: str | int | None) -> None:
        self.variable.set("" if value is None else str(value))  # a count of 0 shows as 0


class TextListControl(Control):
    """One item per line; blank lines are dropped."""

    def __init__(self, parent: tk.Misc, spec: FieldSpec, on_change: OnChange) -> None:
        super().__init__(parent, spec, on_change)
        self.textbox = ctk.CTkTextbox(self.frame, width=WIDE_WIDTH + 200, height=90)
        self.textbox.pack(side="left")
        self.textbox.bind("<<Modified>>", self._modified)

    def _modified(self, _event: tk.Event) -> None:
        # Tk sends <<Modified>> once until the flag is cleared; clearing it re-arms the event.
        if self.textbox.edit_modified():
            self.textbox.edit_modified(False)
            self._changed()

    def get(self) -> list[str]:
        lines = self.textbox.get("1.0", "end").splitlines()
        return [line.strip() for line in lines if line.strip()]

    def set(self, value: list[str]) -> None:
        self.textbox.delete("1.0", "end")
        self.textbox.insert("1.0", "\n".join(value))


class NumberListControl(Control):
    """Numbers in one entry, separated by commas or spaces."""

    def __init__(self, parent: tk.Misc, spec: FieldSpec, on_change: OnChange) -> None:
        super().__init__(parent, spec, on_change)
        self.variable = tk.StringVar(master=self.frame, value=format_numbers(spec.default or []))
        self.entry = ctk.CTkEntry(self.frame, textvariable=self.variable, width=WIDE_WIDTH)
        self.entry.pack(side="left")
        self.variable.trace_add("write", self._changed)

    def get(self) -> list[float | str]:
        return parse_numbers(self.variable.get())

    def set(self, value: list[float]) -> None:
        self.variable.set(format_numbers(value))


class NumberControl(Control):
    """An entry, a slider where :func:`slider_range` offers one, an on/off switch for
    ``X | None``. The entry's text is the value; the slider writes snapped values into it."""

    def __init__(self, parent: tk.Misc, spec: FieldSpec, on_change: OnChange) -> None:
        super().__init__(parent, spec, on_change)
        self.range = slider_range(spec)
        self._syncing = False
        self.enabled = tk.BooleanVar(master=self.frame, value=spec.default is not None)
        self.switch: ctk.CTkSwitch | None = None
        if spec.optional:
            self.switch = ctk.CTkSwitch(
                self.frame, text="", variable=self.enabled, onvalue=True, offvalue=False, width=60
            )
            self.switch.pack(side="left", padx=(0, 6))
        initial = "" if spec.default is None else format_number(spec.default)
        self.text = tk.StringVar(master=self.frame, value=initial)
        self.entry = ctk.CTkEntry(self.frame, textvariable=self.text, width=ENTRY_WIDTH)
        self.entry.pack(side="left")
        self.slider: ctk.CTkSlider | None = None
        if self.range is not None:
            start = self.range.start if spec.default is None else spec.default
            self.position = tk.DoubleVar(master=self.frame, value=start)
            self.slider = ctk.CTkSlider(
                self.frame,
                from_=self.range.start,
                to=self.range.end,
                variable=self.position,
                width=SLIDER_WIDTH,
            )
            self.slider.pack(side="left", padx=(10, 0))
            self.position.trace_add("write", self._slider_moved)
        self.text.trace_add("write", self._text_changed)
        self.enabled.trace_add("write", self._switched)
        self._show_enabled()

    @contextmanager
    def _sync(self) -> Iterator[None]:
        """Entry and slider update each other; the flag stops the echo."""
        self._syncing = True
        try:
            yield
        finally:
            self._syncing = False

    def _text_changed(self, *_args: object) -> None:
        if self._syncing:
            return
        value = parse_number(self.spec, self.text.get())
        in_range = (
            self.range is not None
            and isinstance(value, int | float)
            and self.range.start <= value <= self.range.end
        )
        if in_range:
            with self._sync():
                self.position.set(value)
        self._changed()

    def _slider_moved(self, *_args: object) -> None:
        if self._syncing or self.range is None:
            return
        value = self.range.snap(self.position.get())
        number = int(value) if self.spec.kind == "int" else value
        with self._sync():
            self.position.set(value)
            self.text.set(format_number(number))
        self._changed()

    def _switched(self, *_args: object) -> None:
        if self.enabled.get() and not self.text.get().strip():
            self.text.set(format_number(self._starting_value()))
        self._show_enabled()
        self._changed()

    def _starting_value(self) -> float:
        """Where a field that was off starts: near the low end, where thresholds usually sit."""
        if self.spec.bounded:
            value = self.spec.lower + (self.spec.upper - self.spec.lower) * 0.1
            return self.range.snap(value) if self.range else value
        return self.spec.lower or 0

    def _show_enabled(self) -> None:
        state = "normal" if self.enabled.get() or not self.spec.optional else "disabled"
        self.entry.configure(state=state)
        if self.slider is not None:
            self.slider.configure(state=state)
        if self.switch is not None:
            self.switch.configure(text="on" if self.enabled.get() else "off")

    def get(self) -> float | int | str | None:
        if self.spec.optional and not self.enabled.get():
            return None
        return parse_number(self.spec, self.text.get())

    def set(self, value: float | int | None) -> None:
        if self.spec.optional:
            self.enabled.set(value is not None)
        if value is not None:
            self.text.set(format_number(value))


CONTROLS: dict[str, type[Control]] = {
    "bool": BoolControl,
    "choice": ChoiceControl,
    "int": NumberControl,
    "float": NumberControl,
    "text": TextControl,
    "text_list": TextListControl,
    "float_list": NumberListControl,
}


class FieldRow:
    """Label (with the description as tooltip), control and an error line under it, gridded
    into ``parent`` at ``row`` and ``row + 1``."""

    def __init__(
        self, parent: tk.Misc, spec: FieldSpec, row: int, on_change: OnChange, column: int = 0
    ) -> None:
        self.spec = spec
        self.path = spec.path
        self.label = ctk.CTkLabel(parent, text=spec.title, anchor="w")
        self.label.grid(row=row, column=column, sticky="w", padx=(0, 12), pady=(4, 0))
        self.tooltip = Tooltip(self.label, spec.tooltip())
        self.control = CONTROLS[spec.kind](parent, spec, on_change)
        self.control.frame.grid(row=row, column=column + 1, sticky="w", pady=(4, 0))
        Tooltip(self.control.frame, spec.tooltip())
        self.error = ctk.CTkLabel(
            parent, text="", text_color=ERROR_COLOUR, anchor="w", justify="left", wraplength=560
        )
        self.error.grid(row=row + 1, column=column + 1, sticky="w")
        self.error.grid_remove()
        self.message: str | None = None
        self._visible = True

    def get(self) -> Any:
        return self.control.get()

    def set(self, value: Any) -> None:
        self.control.set(value)

    @property
    def visible(self) -> bool:
        return self._visible

    def set_visible(self, visible: bool) -> None:
        """Hide or show the row in place; a hidden row keeps its value, and its grid slot."""
        if visible == self._visible:
            return
        self._visible = visible
        for widget in (self.label, self.control.frame):
            if visible:
                widget.grid()
            else:
                widget.grid_remove()
        if visible and self.message:
            self.error.grid()
        elif not visible:
            self.error.grid_remove()

    def set_error(self, message: str | None) -> None:
        if message == self.message:
            return
        self.message = message
        if message:
            self.error.configure(text=message)
            self.error.grid()
            self.label.configure(text_color=ERROR_COLOUR)
        else:
            self.error.grid_remove()
            self.label.configure(text_color=ctk.ThemeManager.theme["CTkLabel"]["text_color"])


class SectionForm(ctk.CTkFrame):
    """The rows of one config section, nested sections as titled sub-forms.

    ``exclude`` leaves fields to other widgets (the family in the top bar, the concepts list in
    its own editor); a list of sections must be excluded explicitly so none is dropped unseen.
    """

    def __init__(
        self,
        parent: tk.Misc,
        model: type[BaseModel],
        prefix: str,
        on_change: OnChange,
        *,
        exclude: tuple[str, ...] = (),
        title: str | None = None,
        families: tuple[str, ...] = (),
    ) -> None:
        super().__init__(parent, fg_color="transparent")
        self.prefix = prefix
        self.families = families
        """The model families this section applies to (empty: all)."""
        self.rows: dict[str, FieldRow] = {}
        self.subforms: list[SectionForm] = []
        row = 0
        if title:
            heading = ctk.CTkLabel(self, text=title, font=heading_font())
            heading.grid(row=row, column=0, columnspan=2, sticky="w", pady=(6, 2))
            row += 1
        for spec in section_specs(model, prefix, families):
            if spec.name in exclude:
                continue
            if spec.kind == "section_list":
                raise ValueError(f"{spec.path}: a list of sections needs its own editor")
            if spec.kind == "section":
                sub = SectionForm(
                    self,
                    spec.section,
                    spec.path,
                    on_change,
                    title=spec.title,
                    families=spec.families,
                )
                sub.grid(row=row, column=0, columnspan=2, sticky="w", pady=(8, 0))
                self.subforms.append(sub)
            else:
                self.rows[spec.path] = FieldRow(self, spec, row, on_change)
            row += 2
        self.columnconfigure(0, minsize=210)

    def all_rows(self) -> list[FieldRow]:
        rows = list(self.rows.values())
        for sub in self.subforms:
            rows += sub.all_rows()
        return rows

    def show_family(self, family: str) -> None:
        """Show the sub-sections of ``family`` (a family's own options) and hide the others',
        except one holding a field with an error, so nothing that blocks a run is hidden."""
        for sub in self.subforms:
            wanted = not sub.families or family in sub.families
            if wanted or any(row.message is not None for row in sub.all_rows()):
                sub.grid()
            else:
                sub.grid_remove()
            sub.show_family(family)
