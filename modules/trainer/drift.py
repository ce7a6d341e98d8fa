"""The drift meter: what the LoRA changed where it should not, and what it learnt where it should.

A fixed held-out set, measured at fixed noise and timesteps so two measurements differ only by
the weights:

- ``subject`` images (a concept folder: images, ``-masklabel`` weighted masks, captions):
  ``subject_loss`` is the mask-weighted denoising loss (prediction against the training target,
  weights = the mask's levels); ``drift_background`` is the mean squared difference between the
  LoRA model's and the base model's predictions on the latent cells the mask leaves at 0;
- ``world`` images (scenes without the subject, with their captions): ``drift_world`` is the same
  difference over the whole image, i.e. how far the LoRA moved prompts that never name the
  subject.

The base predictions are computed once, when the set is built (with the LoRA switched off, or
before a LoRA exists), and cached. Still images only: the set is a yardstick, not training data.

Two spaces, because an average over noise levels in the prediction's own space is not fair to
them: every family here predicts the flow-matching velocity ``v = noise - x0`` from
``x_t = (1 - t) x0 + t noise``, and a model that predicts the clean image turns it into a
velocity by dividing by ``t``, so the lowest noise level's errors outweigh the rest (at
``t = 0.05`` an error counts 400 times what it does at ``t = 1``). Each reading therefore has

- the velocity-space averages (the original ones, kept under their keys);
- ``clean``: the same three in clean-image space, where the clean image read from a velocity
  is ``x_t - t v``, so an error of ``e`` in ``v`` is ``t e`` in the image and its square
  ``t^2 e^2``: every noise level weighs by what it does to the picture;
- ``bands``: the three per noise level measured (``drift.timesteps``), in clean-image space.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from modules.config.schema import ConceptConfig, TrainConfig
from modules.data.concept import DataError, scan_concept
from modules.data.images import image_size, load_image, load_mask, mask_to_latent
from modules.lora import lora_disabled
from modules.models.base import LoadedModel, ModelFamily, eval_mode, select_text
from modules.trainer.events import DriftBand, DriftMeasured

Autocast = Callable[[], contextlib.AbstractContextManager[Any]]
DRIFT_TIMESTEPS = (0.25, 0.5, 0.75)
"""Noise levels every held-out image is measured at by default (``drift.timesteps``)."""


@dataclass(frozen=True)
class DriftMetrics:
    """One reading; None for a part whose folder was not given."""

    subject_loss: float | None
    """``sum(m (v - target)^2) / sum(m)`` over the subject images, m the mask levels 0..1."""
    drift_background: float | None
    """``mean((v - v_base)^2)`` over the subject images' latent cells where the mask is 0."""
    drift_world: float | None
    """``mean((v - v_base)^2)`` over every latent cell of the world images."""
    clean: DriftBand | None = None
    """The same three over every noise level, in clean-image space (each row's squared errors
    times ``t^2``); its ``timestep`` is None."""
    bands: tuple[DriftBand, ...] = ()
    """The same three at each noise level measured, in clean-image space, lowest first."""


@dataclass
class _Part:
    """One folder's fixed inputs: every (image, timestep) pair is one row."""

    noisy: Tensor
    timesteps: Tensor
    fractions: Tensor
    """(rows,) the noise level of each row, 0..1 (``drift.timesteps``)."""
    target: Tensor
    text: dict[str, Tensor]
    weights: Tensor | None
    """(rows, 1, h, w) mask levels at latent resolution (subject part only)."""
    base: Tensor
    """The base model's predictions, computed once."""


@dataclass
class HeldOutSet:
    """The fixed inputs and cached base predictions; build it with :meth:`build`."""

    subject: _Part | None
    world: _Part | None

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        family: ModelFamily,
        model: LoadedModel,
        *,
        subject_path: str,
        world_path: str,
        resolution: int,
        timesteps: tuple[float, ...] | list[float] = DRIFT_TIMESTEPS,
        seed: int,
        max_images: int,
        device: torch.device,
        autocast: Autocast = contextlib.nullcontext,
        batch_size: int = 8,
    ) -> HeldOutSet:
        """Load both folders (an empty path skips that part) and cache the base predictions.

        Needs the image and text encoders, so the trainer builds it before ``release_encoders``.
        The base is the model with its LoRA switched off, or the model itself before a LoRA is
        added. Each part draws its noise from its own generator seeded with ``seed``, so a
        part's reading does not depend on whether the other folder is given."""
        parts = []
        for field, path, masked in (
            ("drift.subject_path", subject_path, True),
            ("drift.world_path", world_path, False),
        ):
            if not path:
                parts.append(None)
                continue
            images, masks, captions = _load_folder(field, path, resolution, max_images, masked)
            latents = torch.cat(
                [
                    family.encode_images(model, images[i : i + batch_size].to(device)).float()
                    for i in range(0, len(images), batch_size)
                ]
            )  # (images, C, h, w) or (images, C, F, h, w)
            text = family.encode_prompts(model, captions)
            rows = [(i, t) for i in range(len(captions)) for t in timesteps]
            index = torch.tensor([i for i, _ in rows])
            latents = latents[index.to(latents.device)]  # one row per (image, timestep)
            fractions = torch.tensor([t for _, t in rows], dtype=torch.float32, device=device)
            steps = family.timesteps_from_fractions(fractions, latents.shape)
            generator = torch.Generator().manual_seed(seed)
            noise = torch.randn(latents.shape, generator=generator).to(device)
            noisy, target = family.noisy_input_and_target(latents, noise, steps)
            text = select_text({k: v.to(device) for k, v in text.items()}, index.to(device))
            weights = None
            if masks is not None:
                small = torch.stack([mask_to_latent(m, tuple(latents.shape[-2:])) for m in masks])
                weights = small[index].to(device)  # (rows, 1, h, w)
            part = _Part(noisy, steps, fractions, target, text, weights, base=torch.empty(0))
            part.base = _predict(family, model, part, batch_size, autocast, base=True)
            parts.append(part)
        return cls(subject=parts[0], world=parts[1])


@torch.no_grad()
def measure_drift(
    family: ModelFamily,
    model: LoadedModel,
    heldout: HeldOutSet,
    *,
    batch_size: int = 8,
    autocast: Autocast = contextlib.nullcontext,
) -> DriftMetrics:
    """Measure the model as it is now (LoRA on) against the cached base predictions.

    In eval mode (the model's mode is restored after) and without gradients."""
    subject = background = world = None
    if heldout.subject is not None:
        part = heldout.subject
        prediction = _predict(family, model, part, batch_size, autocast, base=False)
        weights = _broadcast(part.weights, prediction)
        error = (prediction - part.target.float()).pow(2)
        subject = _RowSums(error * weights, weights, part.fractions)
        outside = (weights == 0).float()
        change = (prediction - part.base).pow(2)
        background = _RowSums(change * outside, outside, part.fractions)
    if heldout.world is not None:
        part = heldout.world
        prediction = _predict(family, model, part, batch_size, autocast, base=False)
        change = (prediction - part.base).pow(2)
        world = _RowSums(change, torch.ones_like(change), part.fractions)
    measures = (subject, background, world)

    def band(level: float | None, *, clean: bool) -> DriftBand:
        values = [None if m is None else m.mean(level, clean=clean) for m in measures]
        return DriftBand(level, *values)

    levels = sorted({round(t, 6) for m in measures if m is not None for t in m.levels})
    velocity = band(None, clean=False)
    return DriftMetrics(
        velocity.subject_loss,
        velocity.drift_background,
        velocity.drift_world,
        clean=band(None, clean=True),
        bands=tuple(band(level, clean=True) for level in levels),
    )


class _RowSums:
    """One measure's numerator and denominator per row (an image at one noise level): its
    value over some rows is the sum of their numerators over the sum of their denominators."""

    def __init__(self, values: Tensor, weights: Tensor, fractions: Tensor) -> None:
        self.numerator = values.flatten(1).sum(1)
        self.denominator = weights.flatten(1).sum(1)
        self.fractions = fractions.float().to(self.numerator.device)
        self.levels = self.fractions.tolist()

    def mean(self, level: float | None, *, clean: bool) -> float:
        """The weighted mean over the rows at noise ``level`` (every row: None), in clean-image
        space (each row's squared errors times ``t^2``) or the velocity's; 0 where the rows
        hold no weight (a subject whose mask covers every cell has no background)."""
        rows = torch.ones_like(self.fractions, dtype=torch.bool)
        if level is not None:
            rows = (self.fractions - level).abs() < 1e-6
        scale = self.fractions.pow(2) if clean else torch.ones_like(self.fractions)
        weight = self.denominator[rows].sum()
        if weight <= 0:
            return 0.0
        return float((self.numerator[rows] * scale[rows]).sum() / weight)


class DriftMeter:
    """The run's drift meter (``drift.every`` > 0): the held-out set, built before the LoRA
    exists, and a reading every ``drift.every`` steps and after the last one."""

    def __init__(
        self,
        config: TrainConfig,
        family: ModelFamily,
        model: LoadedModel,
        *,
        device: torch.device,
        autocast: Autocast,
    ) -> None:
        drift = config.drift
        self.every, self.last = drift.every, config.training.steps
        self.family, self.model, self.autocast = family, model, autocast
        self.batch_size = config.training.batch_size
        self.heldout = HeldOutSet.build(
            family,
            model,
            subject_path=drift.subject_path,
            world_path=drift.world_path,
            resolution=config.data.resolution,
            timesteps=drift.timesteps,
            seed=drift.seed,
            max_images=drift.max_images,
            device=device,
            autocast=autocast,
            batch_size=self.batch_size,
        )

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.last

    def measure(self, step: int) -> DriftMeasured:
        """The reading of the model as it is now, timed (the steps' timings leave it out)."""
        tick = time.perf_counter()
        reading = measure_drift(
            self.family,
            self.model,
            self.heldout,
            batch_size=self.batch_size,
            autocast=self.autocast,
        )
        return DriftMeasured(
            step=step,
            subject_loss=reading.subject_loss,
            drift_background=reading.drift_background,
            drift_world=reading.drift_world,
            seconds=time.perf_counter() - tick,
            clean=reading.clean,
            bands=reading.bands,
        )

    @staticmethod
    def row(reading: DriftMeasured) -> dict[str, float | None]:
        """A reading's ``metrics.jsonl`` keys (the subject loss is the held-out set's)."""
        return {**reading_keys(reading, "heldout_subject_loss"), "drift_seconds": reading.seconds}


def reading_keys(reading: DriftMetrics | DriftMeasured, subject: str) -> dict[str, float | None]:
    """A reading as flat keys: the velocity-space averages as ``subject`` (the subject loss's
    name), ``drift_background`` and ``drift_world``; the clean-image ones with ``_clean``; each
    noise level's with ``_t`` and the level (``drift_background_t0.25``)."""
    keys: dict[str, float | None] = {
        subject: reading.subject_loss,
        "drift_background": reading.drift_background,
        "drift_world": reading.drift_world,
    }
    for band in (reading.clean, *reading.bands):
        if band is None:
            continue
        tail = "_clean" if band.timestep is None else f"_t{band.timestep:g}"
        keys[f"{subject}{tail}"] = band.subject_loss
        keys[f"drift_background{tail}"] = band.drift_background
        keys[f"drift_world{tail}"] = band.drift_world
    return keys


def _predict(
    family: ModelFamily,
    model: LoadedModel,
    part: _Part,
    batch_size: int,
    autocast: Autocast,
    *,
    base: bool,
) -> Tensor:
    """Predictions for every row of ``part`` (float32), as the trainer's forward: autocast, and
    the model in eval mode so that both the base and the LoRA passes are deterministic."""
    has_lora = bool(getattr(model.denoiser, "peft_config", None))
    switch = lora_disabled(model.denoiser) if base and has_lora else contextlib.nullcontext()
    out = []
    with switch, eval_mode(model.denoiser), autocast():
        for start in range(0, part.noisy.shape[0], batch_size):
            rows = torch.arange(start, min(start + batch_size, part.noisy.shape[0]))
            rows = rows.to(part.noisy.device)
            prediction = family.predict(
                model, part.noisy[rows], part.timesteps[rows], select_text(part.text, rows)
            )
            out.append(prediction.float())
    return torch.cat(out)


def _broadcast(weights: Tensor | None, like: Tensor) -> Tensor:
    """(rows, 1, h, w) weights against (rows, C, h, w) or (rows, C, F, h, w) predictions."""
    assert weights is not None
    if like.ndim == 5:
        weights = weights.unsqueeze(2)
    return weights.expand_as(like)


def _load_folder(
    field: str, path: str, resolution: int, max_images: int, masked: bool
) -> tuple[Tensor, list[Tensor] | None, list[str]]:
    if not Path(path).is_dir():
        raise DataError(
            f"{field}: folder '{path}' not found; point it at a folder of held-out images "
            "(with captions) or leave it empty"
        )
    scan = scan_concept(ConceptConfig(path=path))
    items = [item for item in scan.items if not item.clip][:max_images]
    if not items:
        raise DataError(f"{field}: '{path}' holds no still images; the drift meter needs some")
    if masked:
        unmasked = [item.image.name for item in items if item.mask is None]
        if unmasked:
            raise DataError(
                f"{field}: {', '.join(unmasked[:3])} in '{path}' has no -masklabel mask; the "
                "subject part needs a mask for every image"
            )
    images = torch.stack([load_image(item.image, resolution) for item in items])
    masks = None
    if masked:
        masks = [
            load_mask(item.mask, image_size(item.image), resolution)
            for item in items
            if item.mask is not None
        ]
    return images, masks, [item.caption for item in items]
