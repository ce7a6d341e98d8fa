"""Preset files the CLI cannot use: status 2 and one line naming the file, never a traceback."""

import codecs
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TEXT = json.dumps(
    {"schema_version": 1, "description": "Café", "training": {"steps": 3}}, ensure_ascii=False
)


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "modules.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def latin1(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(TEXT.encode("latin-1"))
    return (
        path,
        f"{path}: not UTF-8 text (byte 0xe9 at position 41, line 1): save the preset as UTF-8",
    )


def utf16(tmp_path):
    path = tmp_path / "utf16.json"
    path.write_bytes(TEXT.encode("utf-16"))
    return (
        path,
        f"{path}: not UTF-8 text (byte 0xff at position 0, line 1): save the preset as UTF-8",
    )


def folder(tmp_path):
    return tmp_path, f"{tmp_path} is a folder, not a preset file: give the path of a .json file"


def under_a_file(tmp_path):
    parent = tmp_path / "preset.json"
    parent.write_text(TEXT)
    path = parent / "preset.json"
    return path, f"{path}: preset file not found; check the path"


@pytest.mark.parametrize("command", ["check", "train"])
@pytest.mark.parametrize("make", [latin1, utf16, folder, under_a_file])
def test_an_unusable_preset_file_exits_2_naming_it(tmp_path, command, make):
    path, message = make(tmp_path)
    result = cli(command, str(path))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: {message}"


def test_a_preset_with_a_byte_order_mark_checks_ok(tmp_path):
    path = tmp_path / "notepad.json"
    path.write_bytes(codecs.BOM_UTF8 + (REPO / "presets/demo-prior.json").read_bytes())
    result = cli("check", str(path))
    assert result.returncode == 0, result.stderr
    assert f"{path}: OK" in result.stdout
