"""TensorBoard and Weights & Biases, through accelerate's trackers (``output.log_with``).

They get the same numbers as ``metrics.jsonl`` (every row, drift readings included, at its
step), the samples as images, and the resolved config as hyperparameters. With
``output.log_with=none`` (the default) nothing here does anything. Event files go to
``RUN_DIR/logs/<output.name>/``.

A tracker is an extra: one that cannot start stops the run before training with its folder or
its error named (a ConfigError); one that fails later is said once and switched off, and the
run goes on (``metrics.jsonl`` and the samples folder keep everything); one that fails to close
is said. Nothing a tracker raises leaves this module any other way.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import Accelerator
from PIL import Image

from modules.config import ConfigError, TrainConfig, resolved_config_json

NAMES = {"tensorboard": "TensorBoard", "wandb": "Weights & Biases"}
"""How messages name each ``output.log_with``."""


class Trackers:
    """The run's trackers, or none: ``log`` and ``image`` are no-ops without them."""

    def __init__(
        self,
        accelerator: Accelerator,
        config: TrainConfig,
        status: Callable[[str, str], None] = lambda _text, _level: None,
    ) -> None:
        self.accelerator = accelerator
        self.config = config
        self.active = config.output.log_with != "none"
        self.name = NAMES.get(config.output.log_with, config.output.log_with)
        self.folder = Path(config.output.run_dir) / "logs" / config.output.name
        """Where a tracker that writes files (TensorBoard) writes them."""
        self._status = status

    def start(self) -> None:
        """Start the trackers, or a ConfigError naming what is in the way and the fix."""
        if not self.active:
            return
        hyper = _flat(json.loads(resolved_config_json(self.config)))
        try:
            self.accelerator.init_trackers(self.config.output.name, config=hyper)
        except Exception as error:  # a tracker's code (import, folders, login) raises anything
            self._close(say=False)
            raise ConfigError(self._start_problem(error)) from None

    def log(self, row: dict[str, Any]) -> None:
        """A metrics.jsonl row: its numbers at its step."""
        if not self.active:
            return
        values = {
            key: float(value)
            for key, value in row.items()
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool)
        }
        step = int(row["step"])
        try:
            self.accelerator.log(values, step=step)
        except Exception as error:  # see start: whatever it is, training goes on
            self._switch_off(step, error)

    def image(self, tag: str, picture: Image.Image, step: int) -> None:
        if not self.active:
            return
        try:
            for tracker in self.accelerator.trackers:
                if tracker.name == "tensorboard":
                    pixels = np.asarray(picture.convert("RGB"))[None]  # (1, H, W, 3)
                    tracker.log_images({tag: pixels}, step=step, dataformats="NHWC")
                else:
                    tracker.log_images({tag: [picture]}, step=step)
        except Exception as error:  # see start
            self._switch_off(step, error)

    def end(self) -> None:
        """Close the trackers; one that fails to close is said, never raised. The process group
        is left to :meth:`Processes.close`, which ends it after the processes have met."""
        self._close(say=True)

    # ---------------------------------------------------------------------------------------

    def _switch_off(self, step: int, error: Exception) -> None:
        self._status(
            f"warning: {self.name} failed at step {step} ({_text(error)}): training goes on "
            f"without it; metrics.jsonl and the samples folder in {self.config.output.run_dir} "
            "keep every value",
            "warning",
        )
        self._close(say=False)

    def _close(self, say: bool) -> None:
        self.active = False
        trackers, self.accelerator.trackers = list(self.accelerator.trackers), []
        for tracker in trackers:
            try:
                tracker.finish()
            except Exception as error:  # see start; a half-started tracker fails here too
                if say:
                    self._status(
                        f"warning: {self.name} could not close its logs ({_text(error)}); its "
                        "last values may be missing there (metrics.jsonl has them all)",
                        "warning",
                    )

    def _start_problem(self, error: Exception) -> str:
        setting = f"output.log_with={self.config.output.log_with}"
        blocked = _file_in_the_way(self.folder)
        if blocked is not None:
            return (
                f"{setting}: {blocked} is a file, not a folder, and {self.name} writes its logs "
                f"in {self.folder}; move or delete that file, or set output.log_with=none"
            )
        return (
            f"{setting}: {self.name} could not start ({_text(error)}); fix that, or set "
            "output.log_with=none to train without it"
        )


def _file_in_the_way(folder: Path) -> Path | None:
    """The nearest existing path at or above ``folder`` when it is not a folder."""
    for path in (folder, *folder.parents):
        if path.exists() or path.is_symlink():
            return None if path.is_dir() else path
    return None


def _text(error: BaseException) -> str:
    """The first failure of a chain: a failed import that a fallback import followed (as
    accelerate's TensorBoard tries tensorboardX) is named by the first, which says why."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    return f"{type(error).__name__}: {error}"


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """Nested config values as ``section.field`` keys; lists and None as text."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= _flat(value, f"{name}.")
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat
