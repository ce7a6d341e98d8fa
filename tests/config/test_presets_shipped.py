"""Every file in presets/ loads and validates (and is in the sparse form the app writes)."""

import json
from pathlib import Path

import pytest

from modules.config import SCHEMA_VERSION, load_preset, preset_dict

PRESETS = sorted((Path(__file__).resolve().parents[2] / "presets").glob("*.json"))


def test_there_are_presets():
    names = {p.stem for p in PRESETS}
    assert {"demo-no-prior", "demo-prior", "demo-threshold", "demo-prior-prediction"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_preset_loads_and_is_sparse(path):
    config = load_preset(path)
    data = json.loads(path.read_text())
    assert data["schema_version"] == SCHEMA_VERSION
    assert data.get("description"), "every shipped preset says what it is for"
    assert preset_dict(config, data["description"]) == data, (
        "preset has default values spelled out or is not canonical"
    )
