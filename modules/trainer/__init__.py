"""The trainer shared by the UI and the CLI, and the events it emits."""

from modules.trainer.events import (
    Command,
    DriftMeasured,
    Event,
    FileSaved,
    Finished,
    SamplePair,
    SampleSaved,
    StatusMessage,
    StepMetrics,
)
from modules.trainer.generic_trainer import GenericTrainer, TrainingError

__all__ = [
    "Command",
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
