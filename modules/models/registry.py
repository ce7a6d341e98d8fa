"""The model families, by name: their declarations eagerly (plain data, no torch), their code
only when a run uses them."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from modules.models import demo, flux1, wan
from modules.models.spec import FamilySpec

if TYPE_CHECKING:
    from modules.models.base import ModelFamily

SPECS: dict[str, FamilySpec] = {spec.name: spec for spec in (demo.SPEC, wan.SPEC, flux1.SPEC)}
"""One entry per family; a new family adds its package's ``SPEC`` here."""


def family_spec(name: str) -> FamilySpec:
    try:
        return SPECS[name]
    except KeyError:
        raise LookupError(
            f"model.family: unknown family {name!r}; known: {', '.join(SPECS)}"
        ) from None


def load_family(model_config) -> ModelFamily:
    """The family of ``model_config`` (a ``ModelConfig``), built with its options; imports the
    family's code (torch, diffusers) on first use."""
    spec = family_spec(model_config.family)
    module_name, _, class_name = spec.implementation.partition(":")
    family_class = getattr(importlib.import_module(module_name), class_name)
    return family_class(getattr(model_config, spec.name, spec.options()))
