"""The model families, by name: their declarations eagerly (plain data, no torch), their code
only when a run uses them."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from modules.models.spec import ConditioningKind, FamilySpec

if TYPE_CHECKING:
    from modules.models.base import ModelFamily

FAMILY_PACKAGES = (
    "modules.models.demo",
    "modules.models.wan",
    "modules.models.flux1",
    "modules.models.flux2",
    "modules.models.qwen_image",
    "modules.models.zimage",
    "modules.models.chroma",
    "modules.models.sdxl",
)
"""One line per family: the package whose ``__init__`` declares its ``SPEC`` (no torch)."""

SPECS: dict[str, FamilySpec] = {
    spec.name: spec for spec in (importlib.import_module(name).SPEC for name in FAMILY_PACKAGES)
}


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


def folder_summary(model_config) -> str | None:
    """What the folder at ``model_config.path`` is and trains, in one line (the Model tab);
    None when its family does not say or there is no folder."""
    spec = family_spec(model_config.family)
    return spec.summary_of(model_config.path, getattr(model_config, spec.name, spec.options()))


def conditioning_kinds(model_config) -> tuple[ConditioningKind, ...]:
    """The conditioning kinds a run of ``model_config`` (a ``ModelConfig``) encodes and feeds
    its denoiser: the family's, or for a family that reads them from the folder (WAN
    image-to-video), the folder's with the family's options."""
    spec = family_spec(model_config.family)
    options = getattr(model_config, spec.name, spec.options())
    return spec.conditioning_of(model_config.path, options)
