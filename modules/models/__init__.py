"""Model families behind one Protocol, registered by name."""

from modules.models.base import LoadedModel, ModelFamily, ModelLoadError, TextEncoding, select_text
from modules.models.demo import DemoFamily

FAMILIES: dict[str, ModelFamily] = {"demo": DemoFamily()}


def get_family(name: str) -> ModelFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        known = ", ".join(FAMILIES)
        raise ModelLoadError(f"model.family: unknown family {name!r}; known: {known}") from None


__all__ = [
    "FAMILIES",
    "LoadedModel",
    "ModelFamily",
    "ModelLoadError",
    "TextEncoding",
    "get_family",
    "select_text",
]
