"""The user's folder: presets and the last-used config."""

import codecs

import pytest

from app import user_store
from app.user_store import BUILTIN_PRESETS, UserStore, user_home
from modules.config import ConfigError, TrainConfig, load_preset


def test_home_is_the_environment_folder_or_the_config_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("MASKPRIOR_HOME", str(tmp_path / "mine"))
    assert user_home() == tmp_path / "mine"
    monkeypatch.delenv("MASKPRIOR_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert user_home() == tmp_path / ".config" / "maskprior-trainer"


def test_presets_lists_builtin_then_own(tmp_path):
    store = UserStore(tmp_path)
    config = TrainConfig(training={"steps": 7})
    store.save(config, store.preset_path("zeta"))
    store.save(config, store.preset_path("alpha"))
    entries = store.presets()
    builtin = sorted(p.stem for p in BUILTIN_PRESETS.glob("*.json"))
    assert [e.name for e in entries] == [*builtin, "alpha", "zeta"]
    assert entries[0].label.endswith("(built-in)") and entries[-1].label == "zeta"
    assert load_preset(store.preset_path("alpha")).training.steps == 7


def test_names_are_checked(tmp_path):
    store = UserStore(tmp_path)
    assert store.preset_path(" my run.json ") == tmp_path / "presets" / "my run.json"
    for bad in ("", "../escape", "a/b", ".hidden"):
        with pytest.raises(ConfigError, match="preset name"):
            store.preset_path(bad)


def test_builtin_presets_are_read_only(tmp_path):
    store = UserStore(tmp_path)
    with pytest.raises(ConfigError, match="read-only"):
        store.save(TrainConfig(), BUILTIN_PRESETS / "demo-prior.json")


def test_last_used_round_trip(tmp_path):
    store = UserStore(tmp_path)
    assert store.load_last_used() is None
    config = TrainConfig(mask={"gamma": 0.5}, prior={"threshold": 0.2})
    store.save_last_used(config)
    assert store.load_last_used() == config


BROKEN = {
    "latin-1": ('{"description": "caf\xe9"}'.encode("latin-1"), "not UTF-8 text (byte 0xe9"),
    "utf-16": ('{"schema_version": 1}'.encode("utf-16"), "not UTF-8 text (byte 0xff"),
    "not json": (b"{not json", "not valid JSON"),
    "wrong field": (b'{"schema_version": 1, "mask": {"gama": 0.5}}', "did you mean 'gamma'"),
    "newer": (b'{"schema_version": 999}', "newer than this program understands"),
}


@pytest.mark.parametrize("content, why", BROKEN.values(), ids=BROKEN)
def test_a_broken_last_used_file_is_set_aside_and_named(tmp_path, monkeypatch, content, why):
    monkeypatch.setattr(user_store, "_timestamp", lambda: "20250102-030405")
    store = UserStore(tmp_path)
    (tmp_path / "last-used.json").write_bytes(content)
    with pytest.raises(ConfigError) as raised:
        store.load_last_used()
    moved = tmp_path / "last-used.broken-20250102-030405.json"
    reason, where = str(raised.value).splitlines()
    assert reason.startswith(f"{tmp_path / 'last-used.json'}") and why in reason
    assert where == f"It was set aside as {moved}."
    assert moved.read_bytes() == content
    assert not (tmp_path / "last-used.json").exists()
    assert store.load_last_used() is None  # the next start opens the defaults


def test_a_set_aside_file_never_overwrites_an_earlier_one(tmp_path, monkeypatch):
    monkeypatch.setattr(user_store, "_timestamp", lambda: "20250102-030405")
    store = UserStore(tmp_path)
    for content in (b"first", b"second", b"third"):
        (tmp_path / "last-used.json").write_bytes(content)
        with pytest.raises(ConfigError):
            store.load_last_used()
    kept = {p.name: p.read_bytes() for p in tmp_path.glob("last-used.broken-*.json")}
    assert kept == {
        "last-used.broken-20250102-030405.json": b"first",
        "last-used.broken-20250102-030405-2.json": b"second",
        "last-used.broken-20250102-030405-3.json": b"third",
    }


def test_a_last_used_file_with_a_byte_order_mark_is_restored(tmp_path):
    store = UserStore(tmp_path)
    config = TrainConfig(training={"steps": 9})
    store.save_last_used(config)
    path = tmp_path / "last-used.json"
    path.write_bytes(codecs.BOM_UTF8 + path.read_bytes())
    assert store.load_last_used() == config
    assert list(tmp_path.glob("*.broken-*")) == []
