"""Model families behind one Protocol, registered by name."""

from collections.abc import Callable

from modules.config.schema import ModelConfig
from modules.models.base import LoadedModel, ModelFamily, ModelLoadError, TextEncoding, select_text
from modules.models.demo import DemoFamily
from modules.models.wan import WanFamily

FAMILIES: dict[str, Callable[[ModelConfig], ModelFamily]] = {"demo": DemoFamily, "wan": WanFamily}
"""Family name → constructor taking the model config (for family options such as a flow shift)."""


def get_family(config: ModelConfig) -> ModelFamily:
    try:
        factory = FAMILIES[config.family]
    except KeyError:
        known = ", ".join(FAMILIES)
        raise ModelLoadError(
            f"model.family: unknown family {config.family!r}; known: {known}"
        ) from None
    return factory(config)


__all__ = [
    "FAMILIES",
    "LoadedModel",
    "ModelFamily",
    "ModelLoadError",
    "TextEncoding",
    "get_family",
    "select_text",
]
