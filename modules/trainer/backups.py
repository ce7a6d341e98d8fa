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
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from peft import set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict

from modules.config import ConfigError, TrainConfig, resolved_config_json
from modules.trainer.batch_stream import BatchStream
from modules.trainer.processes import Processes
from modules.trainer.run_folder import os_error_reason

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
    "lora.init_from",
    "mask.tiers.",
)
"""Settings (or prefixes, ending in a dot) a resumed run may change. ``lora.init_from`` only
shapes step 0, whose result the backup holds; the mask tiers are for making masks."""


@dataclass
class TrainingState:
    """The live objects of a run that a backup holds, and puts back on resume."""

    denoiser: torch.nn.Module
    """The denoiser itself (not a data-parallel wrapper): its LoRA weights."""
    optimizer: torch.optim.Optimizer
    scheduler: Any
    batches: BatchStream
    generator: torch.Generator
    """Noise, timesteps and caption dropout."""
    mask_rng: random.Random
    scaler: torch.amp.GradScaler | None = None

    def shared_random(self) -> dict[str, Any]:
        """The random state every process holds alike (the data order and its place, the noise
        and mask-dropout generators): cheap to take, so taken at each step's start."""
        return {
            "data": self.batches.state(),
            "noise": self.generator.get_state(),
            "mask": self.mask_rng.getstate(),
        }

    def capture(
        self, step: int, shared: dict[str, Any], processes: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """The backup of ``step``: ``shared`` from :meth:`shared_random`, ``processes`` every
        process's own generators (:func:`process_random`), the main process's first."""
        lora = get_peft_model_state_dict(self.denoiser)
        main = processes[0]
        return {
            "step": step,
            "lora": {key: value.detach().cpu() for key, value in lora.items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "data": shared["data"],
            "rng": {
                "torch": main["torch"],
                "cuda": main["cuda"],
                "noise": shared["noise"],
                "mask": shared["mask"],
            },
            "processes": processes,
        }

    def restore(self, state: dict[str, Any], index: int, count: int) -> int:
        """Put the run back as it was at the backup's step (returned), on process ``index``
        of ``count``."""
        written_by = len(state.get("processes") or [None])
        if written_by != count:
            raise ConfigError(
                f"--resume: the backup was written by a run on {written_by} process(es) and this "
                f"one has {count}: resume on {written_by}, or start a new run"
            )
        set_peft_model_state_dict(self.denoiser, state["lora"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.batches.restore(state["data"])
        rng = state["rng"]
        own = state["processes"][index] if state.get("processes") else rng
        torch.set_rng_state(own["torch"])
        if torch.cuda.is_available() and own["cuda"]:
            torch.cuda.set_rng_state_all(own["cuda"])
        self.generator.set_state(rng["noise"])
        self.mask_rng.setstate(rng["mask"])
        return int(state["step"])


class Backups:
    """A run's backups as the loop uses them: the one to resume from, and writing one now. On
    several processes every process takes part (their own generators are gathered) and the
    main one writes."""

    def __init__(
        self,
        config: TrainConfig,
        processes: Processes,
        status: Callable[[str, str], None],
    ) -> None:
        self.config, self.processes, self._status = config, processes, status
        self.run_dir = Path(config.output.run_dir)
        self.state: TrainingState | None = None
        """Set once the run's live objects exist."""

        self.step_start: tuple[dict[str, Any], dict[str, Any]] | None = None
        """The random state (shared, own) at the start of the step being taken, for the
        backup a NaN stop writes."""

    def to_resume(self, which: str | None) -> tuple[Path, dict[str, Any]] | None:
        """The backup ``--resume`` names (``latest`` or a folder), its config checked against
        this run's before anything loads; None for a new run."""
        if which is None:
            return None
        folder = find_backup(self.run_dir, which)
        state, config = read_backup(folder)
        changed = compare_configs(config, json.loads(resolved_config_json(self.config)))
        if changed:
            self._status(f"Resuming with other settings of {', '.join(changed)} (allowed)", "info")
        return folder, state

    def mark_step_start(self) -> None:
        if self.config.output.backup_every and self.state is not None:
            self.step_start = (self.state.shared_random(), process_random())

    def write(
        self, step: int, at: tuple[dict[str, Any], dict[str, Any]] | None = None
    ) -> Path | None:
        """Write a backup of ``step`` (``at``: the random state to record instead, shared and
        own); the folder, or None on the other processes and when the disk refused it (said;
        training goes on)."""
        assert self.state is not None
        shared, own = at or (self.state.shared_random(), process_random())
        processes = gather_object([own]) if self.processes.several else [own]
        if not self.processes.main:
            return None
        captured = self.state.capture(step, shared, processes)
        config_json = resolved_config_json(self.config)
        try:
            folder = write_backup(
                self.run_dir, step, captured, config_json, self.config.output.backup_keep
            )
        except OSError as error:
            self._status(
                f"warning: could not write the backup of step {step} "
                f"({os_error_reason(error)}): training goes on; the earlier backups are kept",
                "warning",
            )
            return None
        self._status(f"Backup: {folder}", "info")
        return folder


def process_random() -> dict[str, Any]:
    """This process's own generators: torch's CPU and CUDA ones (LoRA dropout)."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


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
