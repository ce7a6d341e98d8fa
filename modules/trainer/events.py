"""What the trainer tells its front end (events) and what the front end asks of it (commands).

Events are frozen dataclasses put on a ``queue.Queue``; the UI drains it from its own thread,
the CLI prints them. Commands go the other way on a second queue. Neither side touches the
other's objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path


@dataclass(frozen=True)
class StepMetrics:
    """One optimizer step's loss breakdown (the numbers in ``metrics.jsonl``)."""

    step: int
    total_steps: int
    epoch: int
    loss_total: float
    loss_target: float
    loss_prior: float
    target_weight_mean: float
    prior_weight_mean: float
    prior_weight: float
    """The prior weight this step used (``prior.weight`` after ``prior.schedule``)."""
    teacher_fraction: float
    """Share of the batch the teacher (base model, LoRA off) ran on; 0 when it was skipped."""
    lr: float
    sec_per_step: float
    eta_seconds: float
    expert: str | None = None
    """The expert this step trained (WAN 2.2 A14B with expert=both: ``high_noise`` or
    ``low_noise``); None for a model with one denoiser. The charts split the loss by it."""


@dataclass(frozen=True)
class StatusMessage:
    text: str
    level: str = "info"  # "info" | "warning"


@dataclass(frozen=True)
class FileSaved:
    path: Path
    step: int


@dataclass(frozen=True)
class SampleSaved:
    """One sample image written: with the LoRA at each sampling, the base once per run."""

    path: Path
    step: int
    prompt: str
    with_lora: bool


@dataclass(frozen=True)
class SamplePair:
    """A LoRA sample and the base sample of the same prompt and seed (``sampling.with_base``),
    and ``path``, the two side by side in one image: base left, LoRA right."""

    path: Path
    step: int
    prompt: str
    base_path: Path
    lora_path: Path


@dataclass(frozen=True)
class DriftBand:
    """The drift meter's three measures at one noise level (``timestep``, 0..1), or over every
    level (``timestep`` None), in clean-image space: each squared error times ``t^2``, so every
    noise level weighs by what it does to the picture (``modules.trainer.drift``)."""

    timestep: float | None
    subject_loss: float | None
    drift_background: float | None
    drift_world: float | None


@dataclass(frozen=True)
class DriftMeasured:
    """The drift meter's reading (``modules.trainer.drift``); None for a part not configured.
    ``seconds`` is the measurement's time, which the steps' timings leave out.

    ``subject_loss`` and the drifts are velocity-space averages over every noise level, where
    the lowest level outweighs the rest; ``clean`` is the same in clean-image space and
    ``bands`` each level's, which the line and the Run tab's chart show."""

    step: int
    subject_loss: float | None
    drift_background: float | None
    drift_world: float | None
    seconds: float
    clean: DriftBand | None = None
    bands: tuple[DriftBand, ...] = ()

    def line(self) -> str:
        """``drift @ step 100 (clean-image error): background 1.23e-03, world 4.56e-04,
        held-out subject loss 0.0123; background by noise 0.25/0.5/0.75: 1.1e-03/1.2e-03/
        1.4e-03``, the parts measured only: the CLI's line and the Run tab's log. Without the
        clean-image reading (an older caller), the velocity-space one."""
        shown = self.clean or DriftBand(
            None, self.subject_loss, self.drift_background, self.drift_world
        )
        parts = []
        if shown.drift_background is not None:
            parts.append(f"background {shown.drift_background:.2e}")
        if shown.drift_world is not None:
            parts.append(f"world {shown.drift_world:.2e}")
        if shown.subject_loss is not None:
            parts.append(f"held-out subject loss {shown.subject_loss:.4f}")
        space = " (clean-image error)" if self.clean is not None else ""
        line = f"drift @ step {self.step}{space}: {', '.join(parts)}"
        key = "drift_background" if shown.drift_background is not None else "drift_world"
        if len(self.bands) > 1 and getattr(shown, key) is not None:
            levels = "/".join(f"{b.timestep:g}" for b in self.bands)
            values = "/".join(f"{getattr(b, key):.1e}" for b in self.bands)
            line += f"; {key.removeprefix('drift_')} by noise {levels}: {values}"
        return line


@dataclass(frozen=True)
class Finished:
    """The run ended. ``error`` is None on success or stop; ``lora_path`` is the last saved LoRA
    (never one with non-finite weights)."""

    step: int
    lora_path: Path | None
    error: str | None = None
    stopped: bool = False
    error_kind: str | None = None
    """``config``: the run could not start (a bad config, data or run folder; nothing was trained
    and the run folder is as it was); ``training``: it failed while training or saving."""


def saved_lora_text(path: Path | None) -> str:
    """The last saved LoRA for the end-of-run line: with both WAN experts (``path`` is the
    high-noise file) the pair, else the one file."""
    if path is None:
        return "nowhere (nothing was saved)"
    high = "-high_noise"
    if path.stem.endswith(high):
        low = path.with_name(f"{path.stem.removesuffix(high)}-low_noise{path.suffix}")
        return f"{path} and {low}"
    return str(path)


Event = (
    StepMetrics | StatusMessage | FileSaved | SampleSaved | SamplePair | DriftMeasured | Finished
)


class Command(Enum):
    STOP = "stop"  # save the LoRA and end
    SAVE = "save"  # save the LoRA now, keep training
    SAMPLE = "sample"  # sample now, keep training
