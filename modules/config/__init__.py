"""The typed training config, its presets and overrides."""

from modules.config.presets import (
    ConfigError,
    apply_overrides,
    config_from_dict,
    load_preset,
    preset_dict,
    resolved_config_json,
    save_preset,
)
from modules.config.schema import SCHEMA_VERSION, TrainConfig, config_warnings

__all__ = [
    "SCHEMA_VERSION",
    "ConfigError",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_warnings",
    "load_preset",
    "preset_dict",
    "resolved_config_json",
    "save_preset",
]
