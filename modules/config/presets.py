"""JSON presets: sparse overlays on the config defaults, versioned, migrated, written atomically.

A preset file holds ``schema_version`` and only the values that differ from the defaults. Loading
runs the named migration functions from the file's version up to :data:`SCHEMA_VERSION`, overlays
the result on the defaults and validates it. ``--set a.b=value`` overrides go through the same
validation, so a wrong type or an unknown path fails with a message naming the field.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from modules.atomic import write_text_atomic
from modules.config.schema import SCHEMA_VERSION, TrainConfig
from modules.models.registry import SPECS


class ConfigError(ValueError):
    """A config that cannot be used. The message names the field (or file) and the fix."""


def _v0_to_v1(data: dict[str, Any]) -> dict[str, Any]:
    """Version 0 presets (unversioned) named the prior weight ``prior.preservation_weight``."""
    prior = data.get("prior")
    # A ``prior`` that is not an object is left for validation to name.
    if isinstance(prior, dict) and "preservation_weight" in prior:
        prior = dict(prior)
        prior["weight"] = prior.pop("preservation_weight")
        data = {**data, "prior": prior}
    return data


WAN_OPTIONS_V1 = ("flow_shift", "expert", "transformer_file", "fp8_base")
"""The WAN options that version 1 kept directly under ``model``."""


def _v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    """Version 2 gives each model family its own options section: WAN's ``model.flow_shift``,
    ``model.expert``, ``model.transformer_file`` and ``model.fp8_base`` move to ``model.wan``."""
    model = data.get("model")
    if not isinstance(model, dict) or not any(key in model for key in WAN_OPTIONS_V1):
        return data
    model = dict(model)
    wan = model.get("wan")
    wan = dict(wan) if isinstance(wan, dict) else {}
    for key in WAN_OPTIONS_V1:
        if key in model:
            wan[key] = model.pop(key)
    model["wan"] = wan
    return {**data, "model": model}


def _v2_to_v3(data: dict[str, Any]) -> dict[str, Any]:
    """Version 3 brings aspect-ratio buckets, on by default: a preset written before them
    trained on square crops and keeps doing so (``data.buckets`` false unless it says)."""
    section = data.get("data", {})
    if not isinstance(section, dict) or "buckets" in section:
        return data
    return {**data, "data": {**section, "buckets": False}}


FP8_BASE_FAMILIES_V3 = ("wan", "flux1", "flux2", "qwen_image")
"""The families whose options had ``fp8_base`` up to version 3."""


def _v3_to_v4(data: dict[str, Any]) -> dict[str, Any]:
    """Version 4 gathers what decides where the base weights live in ``model.memory``:
    ``model.<family>.fp8_base: true`` becomes ``model.memory.base_weights: "fp8"``; ``false``
    was the default and just goes. Any other value stays where it was, for validation to name."""
    model = data.get("model")
    if not isinstance(model, dict):
        return data
    model = dict(model)
    fp8 = False
    for name in FP8_BASE_FAMILIES_V3:
        options = model.get(name)
        if isinstance(options, dict) and isinstance(options.get("fp8_base"), bool):
            options = dict(options)
            fp8 = options.pop("fp8_base") or fp8
            model[name] = options
    if fp8:
        memory = model.get("memory")
        memory = dict(memory) if isinstance(memory, dict) else {}
        memory.setdefault("base_weights", "fp8")
        model["memory"] = memory
    return {**data, "model": model}


MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {
    0: _v0_to_v1,
    1: _v1_to_v2,
    2: _v2_to_v3,
    3: _v3_to_v4,
}
"""``MIGRATIONS[v]`` turns a version ``v`` preset into a version ``v + 1`` preset."""


PRESET_KEYS = ("schema_version", "description")
"""Top-level preset keys that are not config fields. ``description`` is free text for people."""


def migrate(data: dict[str, Any], source: str = "preset") -> dict[str, Any]:
    version = data.get("schema_version", 0)
    if not isinstance(version, int) or version < 0:
        raise ConfigError(f"{source}: schema_version must be a whole number, got {version!r}")
    if version > SCHEMA_VERSION:
        raise ConfigError(
            f"{source}: schema_version {version} is newer than this program understands "
            f"({SCHEMA_VERSION}); update MaskPrior Trainer to use it"
        )
    data = {k: v for k, v in data.items() if k not in PRESET_KEYS}
    for step in range(version, SCHEMA_VERSION):
        data = MIGRATIONS[step](data)
    return data


def merge_overlay(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overlay`` onto ``base``; lists and scalars in the overlay replace wholesale."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_overlay(merged[key], value)
        else:
            merged[key] = value
    return merged


def _field_names(model: type[BaseModel], loc: Iterable[Any]) -> list[str]:
    """Names of the fields next to the (unknown) field at ``loc``, for "did you mean" hints."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            break
        inner = _section_type(field.annotation)
        if inner is None:
            break
        model = inner
    return list(model.model_fields)


MOVED_OPTIONS = {
    "fp8_base": (
        "it moved to 'model.memory.base_weights' (fp8_base true is base_weights 'fp8', "
        "false the default 'auto'); older presets are moved on loading"
    ),
}
"""A family option that moved out of ``model.<family>`` (and ``model``, where version 1 had
WAN's) → where it went, said when a current preset or ``--set`` still names it."""


def _family_option_hint(loc: Iterable[Any]) -> str | None:
    """``model.flow_shift`` → "did you mean 'model.wan.flow_shift'?": a family's option given
    directly under ``model`` (where version 1 presets had WAN's); ``model.wan.fp8_base`` → where
    it moved (:data:`MOVED_OPTIONS`)."""
    loc = [str(part) for part in loc]
    moved = len(loc) == 2 or (len(loc) == 3 and loc[1] in SPECS)
    if moved and loc[0] == "model" and loc[-1] in MOVED_OPTIONS:
        return MOVED_OPTIONS[loc[-1]]
    if len(loc) != 2 or loc[0] != "model":
        return None
    owners = [name for name, spec in SPECS.items() if loc[1] in spec.options.model_fields]
    if not owners:
        return None
    return " or ".join(f"did you mean 'model.{name}.{loc[1]}'?" for name in owners)


def _section_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _section_type(arg)
        if found is not None:
            return found
    return None


def format_validation_error(error: ValidationError, source: str = "config") -> str:
    """One line per problem: ``source: field.path: what is wrong (got X); fix``."""
    lines = []
    for item in error.errors():
        loc = [p for p in item["loc"]]
        path = ".".join(str(p) for p in loc)
        if item["type"] == "extra_forbidden":
            siblings = _field_names(TrainConfig, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), siblings, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(siblings)}"
            hint = _family_option_hint(loc) or hint
            lines.append(f"{source}: unknown field '{path}'; {hint}")
            continue
        message = item["msg"].removeprefix("Value error, ")
        if message.startswith(f"{path.split('.')[0]}.") or not path:
            lines.append(f"{source}: {message}")
        else:
            got = (
                f" (got {item['input']!r})" if "input" in item and item["type"] != "missing" else ""
            )
            lines.append(f"{source}: {path}: {message}{got}")
    return "\n".join(lines)


def config_from_dict(data: dict[str, Any], source: str = "config") -> TrainConfig:
    """Migrate, overlay on the defaults and validate a preset-shaped dict."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object at the top level")
    overlay = migrate(data, source)
    merged = merge_overlay(TrainConfig().model_dump(), overlay)
    try:
        return TrainConfig.model_validate(merged)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, source)) from None


def _preset_text(path: Path) -> str:
    """The preset's text: UTF-8, with or without a byte-order mark (Windows Notepad writes one).
    Anything else, or a path that is not a readable file, is a ConfigError naming the file."""
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not a preset file: give the path of a .json file")
    try:
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        raise ConfigError(f"{path}: preset file not found; check the path") from None
    except OSError as error:
        raise ConfigError(
            f"{path}: cannot be read ({error.strerror}); check the file and its permissions"
        ) from None
    position = _not_utf8_at(data)
    if position >= 0:
        line = data.count(b"\n", 0, position) + 1
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{data[position]:02x} at position {position}, "
            f"line {line}): save the preset as UTF-8"
        )
    return data.decode("utf-8").removeprefix("\ufeff")


def _not_utf8_at(data: bytes) -> int:
    """Where ``data`` stops being UTF-8 JSON text, or -1. JSON never holds a raw NUL, and UTF-16
    text without a byte-order mark is ASCII with a NUL after each character, which is valid
    UTF-8: the first NUL counts too, so that such a file is not reported as puzzling JSON."""
    nul = data.find(b"\0")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        return error.start if nul < 0 else min(nul, error.start)
    return nul


def _parse_json(text: str, path: Path) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})"
        ) from None
    except (RecursionError, ValueError):
        # Python's own limits, not JSON syntax: nesting deeper than the stack, integers of
        # more than 4300 digits. No preset field needs either.
        raise ConfigError(
            f"{path}: not a usable preset (nested too deeply or a number too long); "
            "keep to the config's fields"
        ) from None


def load_preset(path: str | os.PathLike[str]) -> TrainConfig:
    path = Path(path)
    return config_from_dict(_parse_json(_preset_text(path), path), str(path))


def _defaults(model: type[BaseModel]) -> dict[str, Any]:
    """The JSON form of a section's default values (required fields have none)."""
    values = {}
    for name, field in model.model_fields.items():
        if field.is_required():
            continue
        value = field.get_default(call_default_factory=True)
        values[name] = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
    return values


def _sparse(values: dict[str, Any], defaults: dict[str, Any], model: type[BaseModel]) -> dict:
    """Only the values that differ from the defaults; list items (concepts) sparse as well."""
    diff: dict[str, Any] = {}
    for key, value in values.items():
        default = defaults.get(key)
        inner = _section_type(model.model_fields[key].annotation)
        if isinstance(value, dict) and isinstance(default, dict) and inner is not None:
            nested = _sparse(value, default, inner)
            if nested:
                diff[key] = nested
        elif value != default:
            if isinstance(value, list) and inner is not None:
                value = [_sparse(item, _defaults(inner), inner) for item in value]
            diff[key] = value
    return diff


def preset_dict(config: TrainConfig, description: str | None = None) -> dict[str, Any]:
    """The sparse preset form of ``config``: schema_version, an optional description, and the
    non-default values."""
    defaults = TrainConfig().model_dump(mode="json")
    sparse = _sparse(config.model_dump(mode="json"), defaults, TrainConfig)
    head: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
    if description:
        head["description"] = description
    return {**head, **sparse}


def read_description(path: str | os.PathLike[str]) -> str | None:
    """The preset's ``description``, or None (for menus and tooltips; no validation)."""
    try:
        value = _parse_json(_preset_text(Path(path)), Path(path)).get("description")
    except (ConfigError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def save_preset(
    config: TrainConfig, path: str | os.PathLike[str], description: str | None = None
) -> None:
    write_text_atomic(path, json.dumps(preset_dict(config, description), indent=2) + "\n")


def resolved_config_json(config: TrainConfig) -> str:
    """The full config with every value spelled out, as saved next to a trained LoRA."""
    data = {"schema_version": SCHEMA_VERSION, **config.model_dump(mode="json")}
    return json.dumps(data, indent=2)


def _parse_value(text: str) -> Any:
    """``--set`` values are JSON where they parse (numbers, true, null, lists), else text."""
    if text.lower() in {"none", "null"}:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(config: TrainConfig, overrides: Iterable[str]) -> TrainConfig:
    """Apply ``a.b=value`` overrides (list items by index: ``data.concepts.0.path=x``)."""
    data = config.model_dump()
    for override in overrides:
        key, sep, raw = override.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {override!r}: expected the form section.field=value")
        parts = key.split(".")
        node: Any = data
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            known = _field_names(TrainConfig, parts[:index])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(
                        f"--set {key}: '{part}' is not an index of {'.'.join(parts[:index])} "
                        f"(it has {len(node)} items)"
                    )
                slot: Any = int(part)
            elif isinstance(node, dict) and part in node:
                slot = part
            else:
                close = difflib.get_close_matches(part, known, n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(known)}"
                hint = _family_option_hint(parts[: index + 1]) or hint
                raise ConfigError(f"--set {key}: unknown field '{part}'; {hint}")
            if last:
                node[slot] = _parse_value(raw)
            else:
                node = node[slot]
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, "--set")) from None
