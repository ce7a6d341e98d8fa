"""Atomic writes: the old file survives a failed write, and the new file's mode follows the
umask like any file the user writes (not the owner-only mode of a temporary file)."""

import os
import stat

import pytest

from modules import atomic
from modules.atomic import replacing, write_bytes_atomic, write_text_atomic


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_files_get_the_umask_mode_not_owner_only(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_FILE_MODE", 0o644)
    write_text_atomic(tmp_path / "preset.json", "{}\n")
    write_bytes_atomic(tmp_path / "cache.safetensors", b"\x00" * 8)
    assert mode(tmp_path / "preset.json") == 0o644
    assert mode(tmp_path / "cache.safetensors") == 0o644


def test_the_mode_is_read_from_the_process_umask():
    expected = 0o666 & ~atomic._read_umask()
    assert expected == atomic._FILE_MODE


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "lora.json"
    write_text_atomic(path, "old\n")
    with pytest.raises(RuntimeError), replacing(path) as temporary:
        temporary.write_text("half a fi", encoding="utf-8")
        raise RuntimeError("crash mid-write")
    assert path.read_text(encoding="utf-8") == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["lora.json"]


def test_a_write_creates_missing_folders_and_replaces_the_file(tmp_path):
    path = tmp_path / "runs" / "a" / "table.md"
    write_text_atomic(path, "one\n")
    write_text_atomic(path, "two\n")
    assert path.read_text(encoding="utf-8") == "two\n"
    assert [p.name for p in path.parent.iterdir()] == ["table.md"]
