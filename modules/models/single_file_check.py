"""Whether a family's ``transformer_file`` holds that family's transformer at the size of the
model folder, from the file's header alone.

A safetensors file starts with a JSON header naming every tensor with its shape, so a file of
another family (a Qwen-Image checkpoint given to WAN) or of another size (WAN 14B given with
the 1.3B folder, whose configs it is loaded on) is named here in a second, before the model
loads, instead of failing minutes later inside the loader or, worse, loading with the wrong
shapes. The families declare their files' look (:class:`~modules.models.spec.SingleFileLayout`):
markers that tell the families apart in every key layout they read, the keys that give the
width, and the keys of each kind of block.

No torch: ``check`` and the preflight of ``train`` run it.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

from modules.models.registry import SPECS
from modules.models.spec import FamilySpec, SingleFileLayout

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "model.")
"""Key prefixes of ComfyUI's and other tools' single files, removed before the keys are read."""
_HEADER_MOST = 100 * 2**20
"""A header larger than this is not a safetensors header (real ones are a few MB)."""


def read_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's name (prefix removed) → its shape, from the file's header. OSError or
    ValueError when the file is not a safetensors file."""
    with open(path, "rb") as file:
        start = file.read(8)
        if len(start) < 8:
            raise ValueError("too short for a safetensors file")
        (size,) = struct.unpack("<Q", start)
        if not 0 < size <= _HEADER_MOST:
            raise ValueError("no safetensors header")
        header = json.loads(file.read(size))
    if not isinstance(header, dict):
        raise ValueError("no safetensors header")
    return {
        _without_prefix(name): tuple(entry.get("shape", ()))
        for name, entry in header.items()
        if name != "__metadata__" and isinstance(entry, dict)
    }


def single_file_problem(spec: FamilySpec, file: str, folder: str) -> str | None:
    """Why ``file`` (the family's ``transformer_file``) cannot be loaded on the model folder
    ``folder`` as ``spec``'s transformer, or None (also None when the family declares no
    layout, or when the file or the folder's config cannot be read: other checks name those)."""
    layout = spec.single_file
    if layout is None or not file:
        return None
    field = f"model.{spec.name}.transformer_file"
    path = Path(file).expanduser()
    if not path.is_file():
        return None  # the preflight names a missing file
    try:
        shapes = read_header(path)
    except (OSError, ValueError) as error:
        return (
            f"{field}: '{path}' is not a safetensors file ({error}): give a .safetensors "
            "transformer"
        )
    label = spec.label or spec.name
    if not _matches(layout, shapes):
        others = [
            other
            for other in SPECS.values()
            if other.name != spec.name and other.single_file and _matches(other.single_file, shapes)
        ]
        if others:
            other = others[0]
            return (
                f"{field}: '{path.name}' holds a {other.label or other.name} transformer, not "
                f"{label}: give a {label} file, or train it with model.family={other.name} "
                f"and a {other.label or other.name} folder as model.path"
            )
        return (
            f"{field}: '{path.name}' does not hold a {label} transformer (none of its "
            f"{len(shapes)} tensors is named like a {label} block): give a {label} file"
        )
    return _size_problem(field, label, layout, shapes, path, folder)


def _size_problem(
    field: str,
    label: str,
    layout: SingleFileLayout,
    shapes: dict[str, tuple[int, ...]],
    path: Path,
    folder: str,
) -> str | None:
    """The file's width and block counts against the folder's transformer config."""
    config_file = Path(folder).expanduser() / "transformer" / "config.json"
    try:
        config: dict[str, Any] = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None
    found, wanted = _dimensions(layout, shapes), {}
    heads, head_dim = config.get("num_attention_heads"), config.get("attention_head_dim")
    if isinstance(heads, int) and isinstance(head_dim, int):
        wanted["width"] = heads * head_dim
    for name in layout.blocks:
        if isinstance(config.get(name), int):
            wanted[name] = config[name]
    differ = [name for name in wanted if name in found and found[name] != wanted[name]]
    if not differ:
        return None
    said = ", ".join(f"{_words(name)} {found[name]}" for name in differ)
    expected = ", ".join(f"{_words(name)} {wanted[name]}" for name in differ)
    return (
        f"{field}: '{path.name}' is a {label} transformer of another size than model.path's "
        f"(the file: {said}; {config_file}: {expected}): point model.path at the folder of the "
        "file's model (the same size), or give that folder's size of file"
    )


def _dimensions(layout: SingleFileLayout, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    found = {}
    for key in layout.width:
        if shapes.get(key):
            found["width"] = shapes[key][0]
            break
    for name, pattern in layout.blocks.items():
        indices = {int(m.group(1)) for key in shapes if (m := re.match(pattern, key))}
        if indices:
            found[name] = max(indices) + 1
    return found


def _matches(layout: SingleFileLayout, shapes: dict[str, tuple[int, ...]]) -> bool:
    def any_key(patterns: tuple[str, ...]) -> bool:
        return any(re.match(pattern, key) for pattern in patterns for key in shapes)

    return any_key(layout.markers) and not any_key(layout.excludes)


def _without_prefix(name: str) -> str:
    for prefix in PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def _words(name: str) -> str:
    return {
        "width": "width",
        "num_layers": "blocks",
        "num_single_layers": "single blocks",
    }.get(name, name)
