"""TensorBoard and Weights & Biases, through accelerate's trackers (``output.log_with``).

They get the same numbers as ``metrics.jsonl`` (every row, drift readings included, at its
step), the samples as images, and the resolved config as hyperparameters. With
``output.log_with=none`` (the default) nothing here does anything. Event files go to
``RUN_DIR/logs/<output.name>/``.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from accelerate import Accelerator
from PIL import Image

from modules.config import TrainConfig, resolved_config_json


class Trackers:
    """The run's trackers, or none: ``log`` and ``image`` are no-ops without them."""

    def __init__(self, accelerator: Accelerator, config: TrainConfig) -> None:
        self.accelerator = accelerator
        self.config = config
        self.active = config.output.log_with != "none"

    def start(self) -> None:
        if self.active:
            hyper = _flat(json.loads(resolved_config_json(self.config)))
            self.accelerator.init_trackers(self.config.output.name, config=hyper)

    def log(self, row: dict[str, Any]) -> None:
        """A metrics.jsonl row: its numbers at its step."""
        if not self.active:
            return
        values = {
            key: float(value)
            for key, value in row.items()
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool)
        }
        self.accelerator.log(values, step=int(row["step"]))

    def image(self, tag: str, picture: Image.Image, step: int) -> None:
        if not self.active:
            return
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                pixels = np.asarray(picture.convert("RGB"))[None]  # (1, H, W, 3)
                tracker.log_images({tag: pixels}, step=step, dataformats="NHWC")
            else:
                tracker.log_images({tag: [picture]}, step=step)

    def end(self) -> None:
        """Close the trackers (and, on several processes, the process group)."""
        self.accelerator.end_training()


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
