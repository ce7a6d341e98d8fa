"""The user's own files: saved presets and the last-used config.

They live under ``$MASKPRIOR_HOME`` when set, else ``~/.config/maskprior-trainer/``. Built-in
presets are the repository's ``presets/`` folder and are never written by the UI. Everything is
saved with :func:`modules.config.save_preset` (sparse, versioned, atomic), so a user preset is an
ordinary preset file the CLI can train from.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from modules.config import ConfigError, TrainConfig, load_preset, save_preset

BUILTIN_PRESETS = Path(__file__).resolve().parents[1] / "presets"
LAST_USED = "last-used.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,79}$")


def user_home() -> Path:
    configured = os.environ.get("MASKPRIOR_HOME")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".config" / "maskprior-trainer"


@dataclass(frozen=True)
class PresetEntry:
    name: str
    path: Path
    builtin: bool

    @property
    def label(self) -> str:
        return f"{self.name} (built-in)" if self.builtin else self.name


class UserStore:
    def __init__(self, root: Path | None = None, builtin: Path = BUILTIN_PRESETS) -> None:
        self.root = root if root is not None else user_home()
        self.presets_dir = self.root / "presets"
        self.builtin_dir = builtin

    def presets(self) -> list[PresetEntry]:
        """Built-in presets first, then the user's, each sorted by name."""
        entries = [PresetEntry(p.stem, p, True) for p in _by_name(self.builtin_dir)]
        if self.presets_dir.is_dir():
            entries += [PresetEntry(p.stem, p, False) for p in _by_name(self.presets_dir)]
        return entries

    def preset_path(self, name: str) -> Path:
        """Where the user's preset ``name`` is saved. Raises ConfigError for an unusable name."""
        name = name.strip().removesuffix(".json")
        if not _NAME.match(name):
            raise ConfigError(
                f"preset name {name!r}: use letters, digits, spaces, '.', '_' or '-' "
                "(up to 80 characters, starting with a letter or digit)"
            )
        return self.presets_dir / f"{name}.json"

    def is_builtin(self, path: Path) -> bool:
        return path.resolve().parent == self.builtin_dir.resolve()

    def save(self, config: TrainConfig, path: Path, description: str | None = None) -> None:
        if self.is_builtin(path):
            raise ConfigError(f"{path}: built-in presets are read-only; use Save as")
        save_preset(config, path, description)

    def save_last_used(self, config: TrainConfig) -> None:
        save_preset(config, self.root / LAST_USED)

    def load_last_used(self) -> TrainConfig | None:
        """The last-used config, or None when there is none yet.

        A file that no longer loads (not UTF-8, not JSON, a wrong field, written by a newer
        version) is set aside, so that saving the next last-used config cannot overwrite it,
        and the ConfigError raised says why it did not load and where it went."""
        path = self.root / LAST_USED
        if not path.is_file():
            return None
        try:
            return load_preset(path)
        except ConfigError as error:
            raise ConfigError(f"{error}\n{_set_aside(path)}") from None


def _set_aside(path: Path) -> str:
    """Rename ``path`` to ``<stem>.broken-<date-time>.json`` next to it, never over an earlier
    one, and say where it went. The file is the user's work: it is never deleted."""
    stamp = _timestamp()
    target = path.with_name(f"{path.stem}.broken-{stamp}.json")
    number = 1
    while target.exists():
        number += 1
        target = path.with_name(f"{path.stem}.broken-{stamp}-{number}.json")
    try:
        path.rename(target)
    except OSError as error:
        return (
            f"It could not be set aside ({error.strerror}): copy it elsewhere before closing "
            "the window, which saves the last-used config over it."
        )
    return f"It was set aside as {target}."


def _timestamp() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def _by_name(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.json"), key=lambda path: (path.stem.casefold(), path.stem))
