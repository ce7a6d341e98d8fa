"""What the UI needs to know about a config field, read from the config model's metadata.

Every widget, label, tooltip, bound and choice in the UI comes from here: the pydantic field's
``title``, ``description``, annotation (``bool``, ``int``, ``float``, ``str``, ``Literal``,
``list[str]``, ``list[float]``, ``X | None``, nested sections) and constraint metadata
(``ge``/``gt``/``le``/``lt``, ``multiple_of``). Nothing in ``app/`` declares a field a second
time.

Pure: no Tk, no torch, so it is tested without a display.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass, replace
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

Kind = Literal[
    "bool", "choice", "int", "float", "text", "text_list", "float_list", "section", "section_list"
]


@dataclass(frozen=True)
class FieldSpec:
    name: str
    path: str
    """Dotted path from the config root, e.g. ``prior.threshold`` or ``data.concepts.0.type``."""
    kind: Kind
    title: str
    description: str
    default: Any
    optional: bool = False
    """``X | None``: the widget has an "off" state meaning None."""
    choices: tuple[str, ...] = ()
    lower: float | None = None
    lower_inclusive: bool = True
    upper: float | None = None
    upper_inclusive: bool = True
    multiple_of: int | float | None = None
    section: type[BaseModel] | None = None
    """The nested model of a ``section`` or ``section_list`` field."""
    families: tuple[str, ...] = ()
    """The model families the field applies to (the schema's ``families`` metadata); empty:
    all of them."""

    def applies_to(self, family: str) -> bool:
        return not self.families or family in self.families

    @property
    def bounded(self) -> bool:
        return self.lower is not None and self.upper is not None

    def bounds_text(self) -> str:
        """The allowed range in words, e.g. ``> 0 and ≤ 10`` (empty when unbounded)."""
        parts = []
        if self.lower is not None:
            parts.append(f"{'≥' if self.lower_inclusive else '>'} {_number(self.lower)}")
        if self.upper is not None:
            parts.append(f"{'≤' if self.upper_inclusive else '<'} {_number(self.upper)}")
        text = " and ".join(parts)
        if self.multiple_of is not None:
            text += f", a multiple of {_number(self.multiple_of)}"
        return text

    def tooltip(self) -> str:
        lines = [self.description] if self.description else []
        if self.bounds_text():
            lines.append(f"Allowed: {self.bounds_text()}.")
        if self.optional:
            lines.append("Switch off for none.")
        return "\n".join(lines)


def section_specs(
    model: type[BaseModel], prefix: str, families: tuple[str, ...] = ()
) -> list[FieldSpec]:
    """The specs of a section's fields, in declaration order. ``families``: those of the
    section itself (a family's own options, ``model.wan``), which its fields inherit."""
    specs = [
        field_spec(name, info, f"{prefix}.{name}") for name, info in model.model_fields.items()
    ]
    if families:
        specs = [spec if spec.families else replace(spec, families=families) for spec in specs]
    return specs


def field_spec(name: str, info: FieldInfo, path: str) -> FieldSpec:
    annotation, optional = _strip_none(info.annotation)
    default = None if info.is_required() else info.get_default(call_default_factory=True)
    extra = info.json_schema_extra
    common = {
        "name": name,
        "path": path,
        "title": info.title or name.replace("_", " ").capitalize(),
        "description": info.description or "",
        "default": default,
        "optional": optional,
        "families": tuple(extra.get("families", ())) if isinstance(extra, dict) else (),
    }
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return FieldSpec(kind="section", section=annotation, **common)
    origin = get_origin(annotation)
    if origin is Literal:
        choices = tuple(str(choice) for choice in get_args(annotation))
        return FieldSpec(kind="choice", choices=choices, **common)
    if origin is list:
        (item,) = get_args(annotation)
        if item is str:
            return FieldSpec(kind="text_list", **common)
        if item is float:
            return FieldSpec(kind="float_list", **common)
        if isinstance(item, type) and issubclass(item, BaseModel):
            return FieldSpec(kind="section_list", section=item, **common)
    if origin in (Union, types.UnionType):  # a count or a word (blocks_to_swap: 16 or auto)
        common["default"] = None if default is None else str(default)
        return FieldSpec(kind="text", **common)
    if annotation is bool:
        return FieldSpec(kind="bool", **common)
    if annotation is str:
        return FieldSpec(kind="text", **common)
    if annotation in (int, float):
        kind = "int" if annotation is int else "float"
        return FieldSpec(kind=kind, **common, **_bounds(info))
    # Failing here, at start-up, names the field; a silent fallback would drop it from the UI.
    raise TypeError(
        f"{path}: the UI has no widget for the type {info.annotation!r}; add a kind for it in "
        "app/field_specs.py and app/field_widgets.py"
    )


def leaf_paths(model: type[BaseModel], prefix: str = "", items: int = 0) -> list[str]:
    """Dotted paths of every non-section field, descending into sections; list sections (the
    concepts) are expanded for ``items`` entries. For checks that every field has a widget."""
    paths = []
    for name, info in model.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        spec = field_spec(name, info, path)
        if spec.kind == "section":
            paths += leaf_paths(spec.section, path, items)
        elif spec.kind == "section_list":
            for index in range(items):
                paths += leaf_paths(spec.section, f"{path}.{index}", items)
        else:
            paths.append(path)
    return paths


def _strip_none(annotation: Any) -> tuple[Any, bool]:
    """``X | None`` → (X, True); anything else → (annotation, False)."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _bounds(info: FieldInfo) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for item in info.metadata:
        if isinstance(item, annotated_types.Ge):
            found.update(lower=item.ge, lower_inclusive=True)
        elif isinstance(item, annotated_types.Gt):
            found.update(lower=item.gt, lower_inclusive=False)
        elif isinstance(item, annotated_types.Le):
            found.update(upper=item.le, upper_inclusive=True)
        elif isinstance(item, annotated_types.Lt):
            found.update(upper=item.lt, upper_inclusive=False)
        elif isinstance(item, annotated_types.MultipleOf):
            found["multiple_of"] = item.multiple_of
    return found


def _number(value: float) -> str:
    """Bounds for people: whole numbers without ".0", large ones grouped (4 294 967 295)."""
    if isinstance(value, float) and not value.is_integer():
        return repr(value)
    whole = int(value)
    return f"{whole:,}".replace(",", " ") if abs(whole) >= 10_000 else str(whole)


# ------------------------------------------------------------------------ numbers and sliders

SLIDER_SPAN_LIMIT = 1000
"""A slider is offered only when the range is at most this many times the default's size (1
for a default of 0): a slider over ten million steps or seeds, or one whose smallest move is
ten times the default learning rate, cannot land on a useful value; the entry can."""


@dataclass(frozen=True)
class SliderRange:
    start: float
    end: float
    step: float
    """Values snap to multiples of this (1 or ``multiple_of`` for whole numbers)."""

    def snap(self, value: float) -> float:
        snapped = self.start + round((value - self.start) / self.step) * self.step
        snapped = min(max(snapped, self.start), self.end)
        # Round away the binary noise of the multiplication (0.7000000000000001 → 0.7).
        return round(snapped, max(0, -math.floor(math.log10(self.step))) + 2)


def slider_range(spec: FieldSpec) -> SliderRange | None:
    """The slider of a bounded number field, or None where a slider would not help."""
    if spec.kind not in ("int", "float") or not spec.bounded:
        return None
    lower, upper = float(spec.lower), float(spec.upper)
    size = abs(spec.default) if spec.default else 1.0
    if upper - lower > SLIDER_SPAN_LIMIT * size:
        return None
    if spec.kind == "int":
        step = spec.multiple_of or 1
        start = lower if spec.lower_inclusive else lower + 1
        end = upper if spec.upper_inclusive else upper - 1
        start, end = math.ceil(start / step) * step, math.floor(end / step) * step
    else:
        # A power of ten giving about a thousand positions: 0.01 for gamma's 0-10.
        step = 10.0 ** math.ceil(math.log10((upper - lower) / SLIDER_SPAN_LIMIT))
        # Exclusive bounds are not valid values: the slider stops one step inside them.
        start = lower if spec.lower_inclusive else lower + step
        end = upper if spec.upper_inclusive else upper - step
    return SliderRange(start=start, end=end, step=step)


def format_number(value: float | int | str) -> str:
    """Text that reads back to exactly ``value`` (``repr`` round-trips floats). Text that is
    not a number (an invalid entry being carried over) is kept as it is."""
    if isinstance(value, str):
        return value
    return str(value) if isinstance(value, int) else repr(float(value))


def format_numbers(values: list[float] | str) -> str:
    """A list of numbers as one line, ``0.25, 0.5, 0.75`` (text is kept as it is)."""
    return values if isinstance(values, str) else ", ".join(format_number(v) for v in values)


def parse_numbers(text: str) -> list[float | str]:
    """Numbers separated by commas or spaces; an item that is not a number stays text, so
    validation names it."""
    items = text.replace(",", " ").split()
    parsed: list[float | str] = []
    for item in items:
        try:
            parsed.append(float(item))
        except ValueError:
            parsed.append(item)
    return parsed


def parse_number(spec: FieldSpec, text: str) -> float | int | str:
    """The number typed into a field, or the text itself when it is not one: validation then
    names the problem ("Input should be a valid number ...") next to the field."""
    text = text.strip()
    try:
        return int(text) if spec.kind == "int" else float(text)
    except ValueError:
        return text
