"""Model families behind one Protocol, registered by name (:mod:`modules.models.registry`).

Importing this package, the registry or a family's declaration loads no torch: the names below
that need it (the Protocol's types, ``get_family``) are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "LoadedModel": "modules.models.base",
    "ModelFamily": "modules.models.base",
    "ModelLoadError": "modules.models.base",
    "TextEncoding": "modules.models.base",
    "select_text": "modules.models.base",
    "get_family": "modules.models.base",
    "load_model": "modules.models.memory",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'modules.models' has no attribute {name!r}")


__all__ = sorted(_LAZY)
