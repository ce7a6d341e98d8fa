"""What the loop does between steps, one part each: scheduled LoRA files, samples, backups and
the drift meter's readings.

Every part is a :class:`BetweenSteps` and the loop knows no other: it calls ``start`` before the
first step, ``readings`` after each step (values for the step's ``metrics.jsonl`` row, taken
after the step's timing), ``after_step`` once the row is written, and ``on_stop`` when the run
stops early. A backup keeps each part's ``state`` and a resume gives it back (``restore``). A
new part (an EMA of the LoRA, validation) is one class here, added in :func:`between_steps`.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from typing import Any

import torch

from modules.config import TrainConfig
from modules.trainer.backups import Backups
from modules.trainer.drift import DriftMeter
from modules.trainer.events import DriftMeasured, Event
from modules.trainer.run_folder import MetricsLog, os_error_reason
from modules.trainer.sampling import Samples
from modules.trainer.saving import LoraSaver
from modules.trainer.trackers import Trackers

Row = dict[str, float | int | None]


class BetweenSteps:
    """One part of a run the loop calls between steps; each hook does nothing unless the part
    overrides it."""

    name = ""
    """The part's key in a backup's ``parts`` (only parts with a ``state`` appear there)."""

    def start(self, step: int) -> None:
        """Training begins at ``step`` (0, or a resumed backup's)."""

    def readings(self, step: int) -> Row:
        """Values measured after ``step`` for its ``metrics.jsonl`` row."""
        return {}

    def after_step(self, step: int) -> None:
        """``step`` is done and its row written: save, sample, back up when due."""

    def on_stop(self, step: int) -> None:
        """The run stops early, after ``step``."""

    def state(self) -> dict[str, Any] | None:
        """What a backup keeps of this part; None: nothing."""
        return None

    def restore(self, state: dict[str, Any]) -> None:
        """Back to a backup's ``state`` (as :meth:`state` gave it)."""


class MetricsRows:
    """``metrics.jsonl`` and the trackers, on the main process: when the disk refuses a row,
    training goes on and the rows are written once it takes them again (said once, and again
    when it recovers)."""

    def __init__(
        self, metrics: MetricsLog, trackers: Trackers, main: bool, status: Callable[..., None]
    ) -> None:
        self.metrics, self.trackers, self.main, self._status = metrics, trackers, main, status

    def append(self, row: Row) -> None:
        if not self.main:
            return
        was_failing = self.metrics.pending > 0
        error = self.metrics.append(row)
        self.trackers.log(row)
        if error is not None and not was_failing:
            self._status(
                f"warning: cannot write {self.metrics.path} ({os_error_reason(error)}): training "
                "goes on; the rows are kept and written when the disk takes them again",
                "warning",
            )
        elif error is None and was_failing:
            self._status(f"{self.metrics.path}: written again, no row lost")


class ScheduledSaves(BetweenSteps):
    """A LoRA file every ``output.save_every`` steps (and the retry of one that failed)."""

    name = "saves"

    def __init__(self, saver: LoraSaver, denoiser: torch.nn.Module) -> None:
        self.saver, self.denoiser = saver, denoiser

    def after_step(self, step: int) -> None:
        self.saver.between_steps(self.denoiser, step)


class ScheduledSamples(BetweenSteps):
    """Samples of the prompts every ``sampling.every`` steps."""

    name = "samples"

    def __init__(self, samples: Samples, config: TrainConfig) -> None:
        self.samples = samples
        self.every = config.sampling.every if config.sampling.prompts else 0

    def after_step(self, step: int) -> None:
        if self.every and step % self.every == 0:
            self.samples.write(step)


class ScheduledBackups(BetweenSteps):
    """A backup every ``output.backup_every`` steps, and one of the step a stop ends on."""

    name = "backups"

    def __init__(self, backups: Backups, config: TrainConfig) -> None:
        self.backups, self.every = backups, config.output.backup_every

    def after_step(self, step: int) -> None:
        if self.every and step % self.every == 0:
            self.backups.write(step)

    def on_stop(self, step: int) -> None:
        if self.every and step % self.every:
            self.backups.write(step)


class DriftReadings(BetweenSteps):
    """The drift meter: a baseline row before the first step, a reading in the row of every
    ``drift.every``-th step, and one of the LoRA a stop is about to save."""

    name = "drift"

    def __init__(self, meter: DriftMeter, events: queue.Queue[Event], rows: MetricsRows) -> None:
        self.meter, self.events, self.rows = meter, events, rows
        self.measured: int | None = None
        """The step of the last reading."""

    def start(self, step: int) -> None:
        if step == 0:  # in a row of its own: no drift yet, the untrained subject loss
            self.rows.append({"step": step, **DriftMeter.row(self._measure(step))})

    def readings(self, step: int) -> Row:
        return DriftMeter.row(self._measure(step)) if self.meter.due(step) else {}

    def on_stop(self, step: int) -> None:
        if self.measured != step:  # stopped between readings
            self.rows.append({"step": step, **DriftMeter.row(self._measure(step))})

    def _measure(self, step: int) -> DriftMeasured:
        event = self.meter.measure(step)
        self.events.put(event)
        self.measured = step
        return event


def between_steps(
    config: TrainConfig,
    *,
    main: bool,
    saver: LoraSaver,
    samples: Samples,
    backups: Backups,
    drift: DriftMeter | None,
    denoiser: torch.nn.Module,
    events: queue.Queue[Event],
    rows: MetricsRows,
) -> list[BetweenSteps]:
    """The run's parts, in the order the loop calls them. The run folder is the main process's
    (LoRA files, samples, drift rows); a backup needs every process. A part whose state
    changes after a step goes before the backups, so that a backup holds the step's state."""
    parts: list[BetweenSteps] = []
    if main:
        parts += [ScheduledSaves(saver, denoiser), ScheduledSamples(samples, config)]
    parts.append(ScheduledBackups(backups, config))
    if drift is not None:
        parts.append(DriftReadings(drift, events, rows))
    return parts
