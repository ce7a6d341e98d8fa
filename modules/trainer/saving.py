"""Writing the run's LoRA files: scheduled saves, the end-of-run save, and what happens when the
disk refuses one (said with the file and the reason; training goes on with the weights in
memory; the save is tried again at the next save point and, at the end, until it succeeds)."""

from __future__ import annotations

import queue
from collections.abc import Callable
from pathlib import Path

import torch

from modules.config import TrainConfig, resolved_config_json
from modules.lora import NonFiniteLoraError, save_lora
from modules.models.base import ComfyConverter
from modules.trainer.events import Command, Event, FileSaved
from modules.trainer.run_folder import os_error_reason

SAVE_RETRY_SECONDS = 10.0
"""How often the final save is tried again after it failed (a full disk, a lost mount)."""
SAVE_RETRY_STEPS = 100
"""How often, in steps, a failed save is tried again between scheduled saves."""

Status = Callable[[str, str], None]


class TrainingError(RuntimeError):
    """The run cannot go on (for example a NaN loss). The message says why and what to change."""


class LoraSaver:
    """The run's LoRA files: ``last_saved`` is never one with non-finite weights (refused)."""

    def __init__(
        self,
        config: TrainConfig,
        *,
        family: str,
        comfyui: ComfyConverter | None,
        events: queue.Queue[Event],
        commands: queue.Queue[Command],
        status: Status,
        experts: dict[str, torch.nn.Module] | None = None,
    ) -> None:
        self.config = config
        self.experts = experts
        """One LoRA per expert (WAN 2.2 A14B, expert=both): each save writes a file per expert,
        ``NAME-high_noise.safetensors`` beside ``NAME-low_noise.safetensors`` (see
        :func:`expert_path`); None: one file, of the denoiser the caller gives."""
        self.family, self.comfyui = family, comfyui
        self.events, self.commands, self.status = events, commands, status
        self.run_dir = Path(config.output.run_dir)
        self.final_path = self.run_dir / f"{config.output.name}.safetensors"
        self.last_saved: Path | None = None
        self.unsaved: Path | None = None
        """A save that failed (e.g. a full disk), tried again at the next save point."""

    def between_steps(self, denoiser: torch.nn.Module, step: int) -> None:
        """The scheduled save of ``step``, or the retry of one that failed."""
        every = self.config.output.save_every
        if every and step % every == 0:
            name = f"{self.config.output.name}-step{step:06d}.safetensors"
            self.save(denoiser, self.run_dir / name, step)
        elif self.unsaved is not None and step % SAVE_RETRY_STEPS == 0:
            self.save(denoiser, self.unsaved, step)

    def save(self, denoiser: torch.nn.Module, path: Path, step: int) -> bool:
        """Write the LoRA to ``path`` (with experts: each expert's to its :func:`expert_path`
        of ``path``); the earlier file there stays intact until the new one is complete (atomic
        write). Returns whether it was written (with experts: every file)."""
        if self.experts is None:
            files = {path: denoiser}
        else:
            files = {expert_path(path, name): each for name, each in self.experts.items()}
        config_json = resolved_config_json(self.config)
        try:
            for file, each in files.items():
                save_lora(
                    each,
                    file,
                    family=self.family,
                    config_json=config_json,
                    layout=self.config.output.format,
                    comfyui=self.comfyui,
                )
        except NonFiniteLoraError as error:  # the step checks make this unreachable; kept safe
            raise TrainingError(f"step {step}: {error}") from None
        except OSError as error:
            self.unsaved = path
            self.status(
                f"warning: could not save {path} ({os_error_reason(error)}): training goes on with "
                "the LoRA in memory; the save is tried again at the next save point and at the end"
                + (f" (last saved: {self.last_saved})" if self.last_saved else ""),
                "warning",
            )
            return False
        self.unsaved = None
        self.last_saved = next(iter(files))  # with experts: the high-noise file, its pair beside
        for file in files:
            self.events.put(FileSaved(path=file, step=step))
        self.status(f"Saved {' and '.join(map(str, files))} (step {step})", "info")
        return True

    def save_final(self, denoiser: torch.nn.Module, step: int) -> None:
        """The end-of-run save, tried until it succeeds: the trained weights exist only in
        memory. Every ``SAVE_RETRY_SECONDS`` until it is written, or until a Stop gives up."""
        while not self.save(denoiser, self.final_path, step):
            self.status(
                f"The LoRA is not saved yet: free space in (or fix) {self.run_dir}; trying again "
                f"every {SAVE_RETRY_SECONDS:g} s. Stop again to give up on this run's LoRA.",
                "warning",
            )
            try:
                command = self.commands.get(timeout=SAVE_RETRY_SECONDS)
            except queue.Empty:
                continue
            if command is Command.STOP:
                kept = f"; the last saved LoRA is {self.last_saved}" if self.last_saved else ""
                raise TrainingError(f"the LoRA could not be saved to {self.final_path}{kept}")

    def kept_text(self) -> str:
        """What a stopped run leaves, for its error message."""
        if self.last_saved:
            return f"the last saved LoRA, {self.last_saved}, is kept (its weights are finite)"
        return "no LoRA had been saved yet, and none with non-finite weights is written"


def expert_path(path: Path, expert: str) -> Path:
    """The file of one expert's LoRA for a save to ``path``: ``NAME.safetensors`` →
    ``NAME-high_noise.safetensors``, ``NAME-step000100.safetensors`` →
    ``NAME-step000100-high_noise.safetensors``."""
    return path.with_name(f"{path.stem}-{expert}{path.suffix}")
