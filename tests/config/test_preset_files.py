"""Reading preset files: UTF-8 with or without a byte-order mark; anything else is a ConfigError
that names the file and the fix, never a Python exception from deeper down."""

import codecs
import json
import re

import pytest

from modules.config import ConfigError, TrainConfig, load_preset
from modules.config.presets import read_description

PRESET = {"schema_version": 3, "description": "Café au lait", "training": {"steps": 12}}
TEXT = json.dumps(PRESET, ensure_ascii=False, indent=2)


def write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_a_preset_with_a_utf8_byte_order_mark_loads(tmp_path):
    path = write(tmp_path / "notepad.json", codecs.BOM_UTF8 + TEXT.encode())
    assert load_preset(path) == TrainConfig(training={"steps": 12})
    assert read_description(path) == "Café au lait"


@pytest.mark.parametrize(
    ("encoding", "byte", "position", "line"),
    [
        ("latin-1", 0xE9, TEXT.encode("latin-1").index(0xE9), 3),
        ("utf-16", 0xFF, 0, 1),  # with its byte-order mark
        ("utf-16-le", 0x00, 1, 1),  # without one: a NUL after every ASCII character
        ("utf-32", 0xFF, 0, 1),
    ],
)
def test_a_preset_that_is_not_utf8_names_the_file_and_the_fix(
    tmp_path, encoding, byte, position, line
):
    path = write(tmp_path / "saved.json", TEXT.encode(encoding))
    with pytest.raises(ConfigError) as raised:
        load_preset(path)
    assert str(raised.value) == (
        f"{path}: not UTF-8 text (byte 0x{byte:02x} at position {position}, line {line}): "
        "save the preset as UTF-8"
    )
    assert read_description(path) is None


def test_a_position_after_a_byte_order_mark_counts_the_mark(tmp_path):
    data = codecs.BOM_UTF8 + TEXT.encode("latin-1")
    path = write(tmp_path / "mixed.json", data)
    with pytest.raises(ConfigError, match=f"at position {data.index(0xE9)}, line 3"):
        load_preset(path)


def test_a_folder_is_not_a_preset(tmp_path):
    with pytest.raises(ConfigError) as raised:
        load_preset(tmp_path)
    assert str(raised.value) == (
        f"{tmp_path} is a folder, not a preset file: give the path of a .json file"
    )
    assert read_description(tmp_path) is None


def test_a_path_under_a_regular_file_is_not_found(tmp_path):
    path = write(tmp_path / "file.json", TEXT.encode()) / "preset.json"
    with pytest.raises(
        ConfigError, match=f"^{re.escape(str(path))}: preset file not found; check the path$"
    ):
        load_preset(path)
    assert read_description(path) is None


def test_a_file_that_cannot_be_read_names_itself(tmp_path, monkeypatch):
    # Tests run as root, which reads a chmod 000 file, so the refusal is simulated.
    path = write(tmp_path / "locked.json", TEXT.encode())

    def refuse(_self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(type(path), "read_bytes", refuse)
    with pytest.raises(ConfigError) as raised:
        load_preset(path)
    assert str(raised.value) == (
        f"{path}: cannot be read (Permission denied); check the file and its permissions"
    )
    assert read_description(path) is None


@pytest.mark.parametrize("text", ["[" * 100_000, '{"training": {"steps": 1' + "0" * 5000 + "}}"])
def test_json_beyond_pythons_limits_names_the_file(tmp_path, text):
    path = write(tmp_path / "odd.json", text.encode())
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: not a usable preset"):
        load_preset(path)
    assert read_description(path) is None


@pytest.mark.parametrize("prior", [5, "ab", [1], None])
def test_an_unversioned_preset_with_a_prior_that_is_not_an_object_names_the_field(tmp_path, prior):
    path = write(tmp_path / "old.json", json.dumps({"prior": prior}).encode())
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: prior: Input should be"):
        load_preset(path)
