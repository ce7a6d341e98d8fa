"""The user's folder: presets and the last-used config."""

from pathlib import Path

import pytest

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


def test_a_broken_last_used_file_names_itself(tmp_path):
    store = UserStore(tmp_path)
    Path(tmp_path, "last-used.json").write_text("{not json")
    with pytest.raises(ConfigError, match="last-used.json"):
        store.load_last_used()
