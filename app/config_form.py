"""The whole config as the UI holds it: every field row, their values as one dict, and
validation mapped back to the rows.

The widgets' values are validated by the config model itself, so the UI and the CLI accept and
reject exactly the same configs; each ``ValidationError`` location (``prior.threshold``,
``data.concepts.0.repeats``) comes back to the row that shows that field.
"""

from __future__ import annotations

import re
import tkinter as tk
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from app.field_widgets import FieldRow
from modules.config import TrainConfig, config_warnings

_PATH_PREFIX = re.compile(r"^([a-z_]+(?:\.[a-z0-9_]+)+): (.*)$", re.DOTALL)


@dataclass(frozen=True)
class Validation:
    config: TrainConfig | None
    errors: dict[str, str] = field(default_factory=dict)
    """Field path → message, for the fields that have a row."""
    general: list[str] = field(default_factory=list)
    """Problems that belong to no row, already prefixed with their field path."""
    warnings: list[str] = field(default_factory=list)

    @property
    def blockers(self) -> list[str]:
        """Why Start is refused, one line each (empty: the config can run)."""
        lines = [f"{path}: {message}" for path, message in self.errors.items()] + self.general
        if self.config is not None and not self.config.data.concepts:
            lines.append("data.concepts: add at least one concept folder on the Concepts tab")
        return lines


def validate_values(values: dict[str, Any], known_paths: set[str]) -> Validation:
    """Validate a full config dict; errors on a path in ``known_paths`` go to that row."""
    try:
        config = TrainConfig.model_validate(values)
    except ValidationError as error:
        errors: dict[str, str] = {}
        general: list[str] = []
        for path, message in error_messages(error):
            row = _row_path(path, known_paths)
            if row is not None:
                if row != path:  # an item of a list field: "drift.timesteps.1" → "item 2: ..."
                    message = f"item {int(path.rsplit('.', 1)[1]) + 1}: {message}"
                errors.setdefault(row, message)
            else:
                general.append(f"{path}: {message}" if path else message)
        return Validation(config=None, errors=errors, general=general)
    return Validation(config=config, warnings=config_warnings(config))


def _row_path(path: str, known_paths: set[str]) -> str | None:
    """The row that shows ``path``: itself, or for an item of a list field (``a.b.2``) the
    list's row."""
    if path in known_paths:
        return path
    parent, _, index = path.rpartition(".")
    return parent if index.isdigit() and parent in known_paths else None


def error_messages(error: ValidationError) -> list[tuple[str, str]]:
    """(field path, message) per problem. Cross-field rules raise at the root with a message
    that starts with the field to change (``prior.weight: ...``); that field is the path."""
    found = []
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if not path and (match := _PATH_PREFIX.match(message)):
            path, message = match.group(1), match.group(2)
        # A field's own validator names the field too; its row already does.
        message = message.removeprefix(f"{path}: ") if path else message
        found.append((path, message))
    return found


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` → ``{"a": {"b": 1}}``."""
    nested: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, name = path.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[name] = value
    return nested


def lookup(data: dict[str, Any], path: str) -> Any:
    node: Any = data
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


class ConfigForm:
    """Collects the rows of the whole window; validates (coalesced to one run per idle moment)
    and tells listeners the result."""

    def __init__(self, host: tk.Misc) -> None:
        self._host = host
        self._rows: dict[str, FieldRow] = {}
        self._lists: dict[str, Callable[[], list[dict[str, Any]]]] = {}
        self._list_rows: dict[str, Callable[[], list[FieldRow]]] = {}
        self._listeners: list[Callable[[Validation], None]] = []
        self._pending: str | None = None
        self.validation = Validation(config=None)

    def add_rows(self, rows: list[FieldRow]) -> None:
        for row in rows:
            if row.path in self._rows:
                raise ValueError(f"{row.path}: the field has two widgets")
            self._rows[row.path] = row

    def add_list(
        self,
        path: str,
        values: Callable[[], list[dict[str, Any]]],
        rows: Callable[[], list[FieldRow]],
    ) -> None:
        """A list of sections (the concepts) kept by its own editor."""
        self._lists[path] = values
        self._list_rows[path] = rows

    def on_validated(self, listener: Callable[[Validation], None]) -> None:
        self._listeners.append(listener)

    def rows(self) -> dict[str, FieldRow]:
        rows = dict(self._rows)
        for provider in self._list_rows.values():
            rows.update({row.path: row for row in provider()})
        return rows

    def row(self, path: str) -> FieldRow:
        return self.rows()[path]

    def values(self) -> dict[str, Any]:
        values = nest({path: row.get() for path, row in self._rows.items()})
        for path, provider in self._lists.items():
            *parents, name = path.split(".")
            node = values
            for part in parents:
                node = node.setdefault(part, {})
            node[name] = provider()
        return values

    def load(self, config: TrainConfig) -> None:
        """Show ``config`` in the rows (lists are loaded by their editors)."""
        data = config.model_dump()
        for path, row in self._rows.items():
            row.set(lookup(data, path))
        self.changed()

    def changed(self) -> None:
        """Called by every control; many changes in one event cost one validation."""
        if self._pending is None:
            self._pending = self._host.after_idle(self.validate)

    def validate(self) -> Validation:
        self._pending = None
        rows = self.rows()
        validation = validate_values(self.values(), set(rows))
        for path, row in rows.items():
            row.set_error(validation.errors.get(path))
        self.validation = validation
        for listener in self._listeners:
            listener(validation)
        return validation

    def cancel(self) -> None:
        if self._pending is not None:
            self._host.after_cancel(self._pending)
            self._pending = None
