"""Backups of a run and resuming from them.

A backup is a folder ``RUN_DIR/backups/stepNNNNNN/`` with ``state.pt`` (the LoRA weights, the
optimizer and scheduler state, every random state that shapes training: torch's CPU and CUDA
generators, the noise and caption-dropout generator, the mask-dropout generator, and the data
order with its position in the pass), ``config.json`` (the resolved config) and
``dataset.json`` (a print of the training items, :mod:`modules.trainer.fingerprint`). It is
written under a temporary name and renamed, so a crash while writing leaves the previous backup
as it was; the last ``output.backup_keep`` are kept.

Resuming continues the run the backup belongs to (see
:func:`~modules.trainer.run_folder.continue_run`). Before the model loads, the backup is read
and checked: a damaged one is named with the fix (``latest`` falls back to the newest complete
backup and says so); ``training.steps`` must lie above the backup's step; a setting that
changes training is refused with the backup's value beside the new one, the harmless ones
(:data:`HARMLESS`) are allowed and listed; a dataset that changed since the backup is said with
counts.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate.utils import gather_object
from peft import set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict

from modules.config import ConfigError, TrainConfig, resolved_config_json
from modules.data.concept import ConceptScan
from modules.trainer.batch_stream import BatchStream
from modules.trainer.fingerprint import dataset_changes, dataset_print
from modules.trainer.processes import Processes
from modules.trainer.run_folder import os_error_reason

if TYPE_CHECKING:
    from modules.trainer.between_steps import BetweenSteps

BACKUPS = "backups"
STATE = "state.pt"
CONFIG = "config.json"
DATASET = "dataset.json"
HARMLESS = (
    "training.steps",
    "output.run_dir",
    "output.name",
    "output.format",
    "data.cache_dir",
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
shapes step 0, whose result the backup holds; the mask tiers are for making masks; the run
folder (moved or copied), the cache folder, the LoRA's name and format change no number.
``training.steps`` must stay above the backup's step (:func:`check_steps`)."""
PARTS = {
    "step": int,
    "lora": dict,
    "optimizer": dict,
    "scheduler": dict,
    "data": dict,
    "rng": dict,
}
"""What ``state.pt`` holds (and its type), checked when it is read."""
INNER = {"data": ("pass_start", "taken", "in_pass"), "rng": ("torch", "cuda", "noise", "mask")}


class DamagedBackup(ConfigError):
    """A backup file that cannot be resumed from; ``what`` names the file and why."""

    def __init__(self, path: Path, why: str) -> None:
        self.what = f"{path} {why}"
        super().__init__(f"--resume: the backup {path.parent} is damaged: {self.what}")


@dataclass(frozen=True)
class Resume:
    """The backup a run continues from, read and checked."""

    folder: Path
    state: dict[str, Any]
    step: int


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
    parts: list[BetweenSteps] = field(default_factory=list)
    """The between-steps parts; a backup holds the state of those that have one."""
    experts: dict[str, torch.nn.Module] | None = None
    """A model trained with one LoRA per expert (WAN 2.2 A14B, expert=both): name → denoiser,
    ``denoiser`` among them; a backup's ``lora`` then holds each expert's weights by name."""

    def lora(self) -> dict[str, Any]:
        """The LoRA weights on the CPU: the denoiser's, or each expert's under its name."""
        if self.experts is None:
            return _lora_weights(self.denoiser)
        return {name: _lora_weights(denoiser) for name, denoiser in self.experts.items()}

    def put_lora(self, lora: dict[str, Any]) -> None:
        """Back to the weights :meth:`lora` gave (a ConfigError when an expert is missing)."""
        if self.experts is None:
            set_peft_model_state_dict(self.denoiser, lora)
            return
        missing = [name for name in self.experts if not isinstance(lora.get(name), dict)]
        if missing:
            raise ConfigError(
                f"--resume: the backup holds no LoRA of the {', '.join(missing)} expert (it is "
                "not of a run with model.wan.expert=both); resume with the backup's settings"
            )
        for name, denoiser in self.experts.items():
            set_peft_model_state_dict(denoiser, lora[name])

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
        main = processes[0]
        parts = {part.name: part.state() for part in self.parts}
        parts = {name: state for name, state in parts.items() if state is not None}
        return {
            "step": step,
            "lora": self.lora(),
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
            **({"parts": parts} if parts else {}),
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
        self.put_lora(state["lora"])
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
        for part in self.parts:
            if part.name in state.get("parts", {}):
                part.restore(state["parts"][part.name])
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
        self.dataset: dict[str, Any] | None = None
        """The dataset's print (:func:`dataset_print`), recorded in every backup; main process."""

    def to_resume(self, which: str | None, scans: list[ConceptScan] | None = None) -> Resume | None:
        """The backup ``--resume`` names (``latest`` or a folder), read and checked against this
        run before anything loads; None for a new run. With ``scans`` (the concepts as this
        run found them) the dataset's print is taken for this run's backups and, on a resume,
        compared with the backup's."""
        resume, known = None, None
        if which is not None:
            folder, state, config = choose_backup(self.run_dir, which, self._status)
            resume = Resume(folder=folder, state=state, step=int(state["step"]))
            check_steps(resume.step, config, self.config.training.steps)
            changed = compare_configs(config, json.loads(resolved_config_json(self.config)))
            if changed:
                self._status(
                    f"Resuming with other settings of {', '.join(changed)} (allowed)", "info"
                )
            known = read_dataset_print(folder)
        wanted = self.config.output.backup_every or resume is not None
        if scans is not None and self.processes.main and wanted:
            self.dataset = dataset_print(scans, known)
            if resume is not None:
                self._say_dataset(resume, known)
        return resume

    def _say_dataset(self, resume: Resume, known: dict[str, Any] | None) -> None:
        if known is None:
            self._status(
                f"warning: the backup {resume.folder} records no dataset (it was written by an "
                "earlier version, or its dataset.json is damaged): whether the images changed "
                "since could not be compared",
                "warning",
            )
            return
        changes = dataset_changes(known, self.dataset or {})
        if changes:
            self._status(
                f"warning: the dataset changed since the backup of step {resume.step}: "
                f"{changes}. The continuation is no longer what training straight through "
                "would have given",
                "warning",
            )

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
            dataset = json.dumps(self.dataset) if self.dataset is not None else None
            folder = write_backup(
                self.run_dir, step, captured, config_json, self.config.output.backup_keep, dataset
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


def _lora_weights(denoiser: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = get_peft_model_state_dict(denoiser)
    return {key: value.detach().cpu() for key, value in state.items()}


def resume_hint(run_dir: Path, last_saved: Path | None) -> str:
    """How to go on after a run ended early: the backup ``--resume latest`` continues from, or
    the LoRA ``last_saved`` a new run can start from."""
    try:
        folder, state, _ = choose_backup(run_dir, "latest", lambda _text, _level: None)
    except ConfigError:
        text = "There is no backup to continue from (output.backup_every makes them)"
        if last_saved is not None:
            text += f"; a new run can start from the LoRA with lora.init_from={last_saved}"
        return text + "."
    return (
        f"To continue, run the same command with --resume latest: it continues from "
        f"{folder} (step {int(state['step'])})."
    )


def process_random() -> dict[str, Any]:
    """This process's own generators: torch's CPU and CUDA ones (LoRA dropout)."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def write_backup(
    run_dir: Path,
    step: int,
    state: dict[str, Any],
    config_json: str,
    keep: int,
    dataset_json: str | None = None,
) -> Path:
    """Write the backup of ``step`` (with the dataset's print, when given) and keep the last
    ``keep``; returns its folder."""
    folder = Path(run_dir) / BACKUPS
    final = folder / f"step{step:06d}"
    partial = folder / f".step{step:06d}.partial"
    for stale in folder.glob(".step*.partial"):  # left by a run killed while writing
        shutil.rmtree(stale, ignore_errors=True)
    partial.mkdir(parents=True)
    torch.save(state, partial / STATE)
    (partial / CONFIG).write_text(config_json + "\n", encoding="utf-8")
    if dataset_json is not None:
        (partial / DATASET).write_text(dataset_json + "\n", encoding="utf-8")
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


def choose_backup(
    run_dir: Path, which: str, status: Callable[[str, str], None]
) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """(folder, state, config) of the backup ``--resume`` names: ``latest``, the run folder's
    newest complete one (damaged newer ones are passed over, and said), or a backup folder. A
    ConfigError naming the file and the fix when there is none to resume from."""
    if which != "latest":
        folder = Path(which).expanduser()
        if not (folder / STATE).is_file():
            inside = backups(folder)  # a run folder given for one of its backups
            hint = f": give one of its backups, e.g. --resume {inside[-1]}" if inside else ""
            raise ConfigError(f"--resume: {folder} is not a backup folder (no {STATE} in it){hint}")
        try:
            return (folder, *read_backup(folder))
        except DamagedBackup as error:
            others = [p for p in backups(folder.parent.parent) if p.name != folder.name]
            fix = f"resume from another backup (--resume {others[-1]}) or " if others else ""
            raise ConfigError(f"{error}; {fix}start a new run without --resume") from None
    found = backups(run_dir)
    if not found:
        raise ConfigError(
            f"--resume latest: {Path(run_dir) / BACKUPS} has no backup; set output.backup_every "
            "to make them, or start without --resume"
        )
    damaged: list[DamagedBackup] = []
    for folder in reversed(found):
        try:
            state, config = read_backup(folder)
        except DamagedBackup as error:
            damaged.append(error)
            continue
        if damaged:
            status(
                f"warning: --resume latest: {'; '.join(d.what for d in damaged)}: resuming from "
                f"the newest complete backup, {folder}",
                "warning",
            )
        return folder, state, config
    raise ConfigError(
        f"--resume latest: every backup in {Path(run_dir) / BACKUPS} is damaged "
        f"({'; '.join(d.what for d in damaged)}): start a new run without --resume"
    )


def read_backup(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the training state, the resolved config) of a backup; a :class:`DamagedBackup` naming
    the file and what is wrong with it."""
    state = _load_state(folder / STATE)
    missing = _missing_parts(state)
    if missing:
        raise DamagedBackup(folder / STATE, f"lacks {', '.join(missing)}: it is not a whole backup")
    path = folder / CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DamagedBackup(path, "is missing") from None
    except OSError as error:
        raise DamagedBackup(path, f"cannot be read ({os_error_reason(error)})") from None
    except ValueError:
        raise DamagedBackup(path, "is not valid JSON (cut short?)") from None
    if not isinstance(config, dict):
        raise DamagedBackup(path, "holds no config")
    return state, config


def _load_state(path: Path) -> dict[str, Any]:
    try:
        size = path.stat().st_size
        with path.open("rb") as file:
            head = file.read(4)
    except OSError as error:
        raise DamagedBackup(path, f"cannot be read ({os_error_reason(error)})") from None
    if size == 0:
        raise DamagedBackup(path, "is empty (0 bytes)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        # torch.load on damaged bytes raises whatever its unpickler meets (EOFError with no
        # text, IndexError, UnpicklingError whose text advises weights_only=False: unsafe for a
        # file of unknown origin). The reason is told from the file, never from that text.
        if head != b"PK\x03\x04":
            why = "is not a backup this program wrote (not a PyTorch archive)"
        elif isinstance(error, pickle.UnpicklingError):
            why = (
                "holds objects a backup never does; it was not loaded (loading them could run code)"
            )
        else:
            why = "is cut short or corrupt (an interrupted copy or a disk error)"
        raise DamagedBackup(path, why) from None


def _missing_parts(state: Any) -> list[str]:
    if not isinstance(state, dict):
        return list(PARTS)
    missing = [name for name, kind in PARTS.items() if not isinstance(state.get(name), kind)]
    for name, keys in INNER.items():
        inner = state.get(name)
        if isinstance(inner, dict):
            missing += [f"{name}.{key}" for key in keys if key not in inner]
    if isinstance(state.get("lora"), dict) and not state["lora"]:
        missing.append("lora (no weights)")
    return missing


def read_dataset_print(folder: Path) -> dict[str, Any] | None:
    """The dataset's print a backup recorded; None for a backup without one (written before
    backups recorded it) or with a damaged one."""
    try:
        data = json.loads((folder / DATASET).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("items"), dict) else None


def check_steps(step: int, old: dict[str, Any], steps: int) -> None:
    """A ConfigError when ``training.steps`` leaves nothing to train after the backup's step."""
    if steps > step:
        return
    before = old.get("training", {}).get("steps") if isinstance(old.get("training"), dict) else None
    raise ConfigError(
        f"--resume: training.steps={steps} (the backup's: {before}) is not above the backup's "
        f"step {step}: nothing would be trained and the LoRA of step {step} written again; set "
        f"training.steps above {step} (e.g. --set training.steps={max(before or 0, step + 1)}), "
        "or use the LoRA the run saved"
    )


def compare_configs(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The settings that differ and are harmless (listed for the user); a ConfigError naming
    the others, each with the backup's value beside the new one."""
    differ = _differences(old, new)
    refused = [name for name in differ if not _harmless(name)]
    if refused:
        shown = ", ".join(
            f"{name} (backup: {_shown(_value(old, name))}, now: {_shown(_value(new, name))})"
            for name in refused
        )
        raise ConfigError(
            f"--resume: the backup was trained with other settings: {shown}; resume with the "
            "backup's values, or start a new run"
        )
    return differ


def _value(config: dict[str, Any], name: str) -> Any:
    value: Any = config
    for part in name.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _shown(value: Any, limit: int = 80) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
