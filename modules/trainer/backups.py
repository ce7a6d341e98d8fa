"""Backups of a run and resuming from them.

A backup is a folder ``RUN_DIR/backups/stepNNNNNN/`` with ``state.pt`` (the LoRA weights, the
optimizer and scheduler state, every random state that shapes training: torch's CPU and CUDA
generators, the noise and caption-dropout generator, the mask-dropout generator, and the data
order with its position in the pass) and ``config.json`` (the resolved config). It is written
under a temporary name and renamed, so a crash while writing leaves the previous backup as it
was; the last ``output.backup_keep`` are kept.

Resuming continues the same run folder: its ``metrics.jsonl`` (rows after the backup's step are
dropped), its samples, its LoRA files. A backup whose config differs in a setting that changes
training is refused with those settings named; the harmless ones (:data:`HARMLESS`) are allowed
and listed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from modules.config import ConfigError

BACKUPS = "backups"
STATE = "state.pt"
CONFIG = "config.json"
HARMLESS = (
    "training.steps",
    "output.save_every",
    "output.backup_every",
    "output.backup_keep",
    "output.log_with",
    "sampling.",
    "drift.every",
)
"""Settings (or prefixes, ending in a dot) a resumed run may change."""


def write_backup(
    run_dir: Path, step: int, state: dict[str, Any], config_json: str, keep: int
) -> Path:
    """Write the backup of ``step`` and keep the last ``keep``; returns its folder."""
    folder = Path(run_dir) / BACKUPS
    final = folder / f"step{step:06d}"
    partial = folder / f".step{step:06d}.partial"
    for stale in folder.glob(".step*.partial"):  # left by a run killed while writing
        shutil.rmtree(stale, ignore_errors=True)
    partial.mkdir(parents=True)
    torch.save(state, partial / STATE)
    (partial / CONFIG).write_text(config_json + "\n", encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)
    for old in backups(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def backups(run_dir: Path) -> list[Path]:
    """The run folder's complete backups, oldest first."""
    folder = Path(run_dir) / BACKUPS
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("step*") if p.is_dir() and (p / STATE).is_file()]
    return sorted(found, key=lambda path: path.name)


def find_backup(run_dir: Path, which: str) -> Path:
    """``latest`` (the run folder's newest backup) or a backup folder; a ConfigError naming the
    fix when there is none."""
    if which != "latest":
        folder = Path(which).expanduser()
        if not (folder / STATE).is_file():
            raise ConfigError(f"--resume: {folder} is not a backup folder (no {STATE} in it)")
        return folder
    found = backups(run_dir)
    if not found:
        raise ConfigError(
            f"--resume latest: {Path(run_dir) / BACKUPS} has no backup; set output.backup_every "
            "to make them, or start without --resume"
        )
    return found[-1]


def read_backup(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the training state, the resolved config) of a backup."""
    try:
        state = torch.load(folder / STATE, map_location="cpu", weights_only=True)
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError, RuntimeError) as error:
        raise ConfigError(f"--resume: cannot read the backup {folder} ({error})") from error
    return state, config


def compare_configs(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The settings that differ and are harmless (listed for the user); a ConfigError naming
    the others."""
    differ = _differences(old, new)
    refused = [name for name in differ if not _harmless(name)]
    if refused:
        raise ConfigError(
            f"--resume: the backup was trained with other settings of {', '.join(refused)}; "
            "resume with the backup's values, or start a new run"
        )
    return differ


def _harmless(name: str) -> bool:
    return any(name == item or (item.endswith(".") and name.startswith(item)) for item in HARMLESS)


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        names = sorted(set(old) | set(new))
        found: list[str] = []
        for name in names:
            found += _differences(old.get(name), new.get(name), f"{prefix}{name}.")
        return found
    return [] if old == new else [prefix.rstrip(".")]
