"""The trainer shared by the UI and the CLI, and the events it emits.

The trainer itself (torch, diffusers: seconds to import) loads on first use, so that
``modules.trainer.preflight`` and ``modules.trainer.run_folder`` answer ``check`` quickly.
"""

from typing import TYPE_CHECKING, Any

from modules.trainer.events import (
    Command,
    DriftBand,
    DriftMeasured,
    Event,
    FileSaved,
    Finished,
    SamplePair,
    SampleSaved,
    StatusMessage,
    StepMetrics,
)

if TYPE_CHECKING:
    from modules.trainer.generic_trainer import GenericTrainer, TrainingError

__all__ = [
    "Command",
    "DriftBand",
    "DriftMeasured",
    "Event",
    "FileSaved",
    "Finished",
    "GenericTrainer",
    "SamplePair",
    "SampleSaved",
    "StatusMessage",
    "StepMetrics",
    "TrainingError",
]


def __getattr__(name: str) -> Any:
    if name in ("GenericTrainer", "TrainingError"):
        from modules.trainer import generic_trainer

        return getattr(generic_trainer, name)
    raise AttributeError(f"module 'modules.trainer' has no attribute '{name}'")
