"""The training step (design §4.4), with flow matching, read top to bottom in :func:`train_step`:

1. the draws: noise and timesteps (``generator``), then per sample, with probability
   ``mask.unmasked_probability``, its mask all ones (``mask_rng``). In this order: the recorded
   losses and an exact resume depend on it;
2. the weight maps of the step's masks, made once by the run's :class:`Weighting`, and the
   samples that need the teacher: prior map > 0 somewhere (and the noise level in
   ``prior.noise_min``-``noise_max``), or from a ``prior_prediction`` concept. None → no teacher;
3. teacher: no-grad forward inside ``lora_disabled`` on exactly those samples' inputs;
4. student forward; ``prior_prediction`` samples take the teacher's prediction as their target;
5. :func:`prediction_loss` on those maps, with each sample's concept weight and noise gate.

The backward and the optimizer are the loop's (``GenericTrainer.optimizer_step``). On several
processes every process draws 1-2 for the whole batch alike and runs 3-5 on its share of it
(:meth:`Processes.split`); its loss is its part of the whole batch's.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch

from modules.config.schema import MaskConfig, PriorConfig
from modules.data.dataset import Batch
from modules.lora import lora_disabled
from modules.loss import LossBreakdown, MaskWeights, Weighting, prediction_loss
from modules.loss.prior_levers import in_noise_range
from modules.models import LoadedModel, ModelFamily, select_text
from modules.models.base import with_conditioning
from modules.trainer.processes import Processes


@dataclass(frozen=True)
class StepResult:
    loss: LossBreakdown
    """The whole batch's loss (on several processes, this process's part of it until the loop
    sums the parts)."""
    teacher_fraction: float
    lr: float = 0.0
    own: torch.Tensor | None = None
    """This process's part of ``loss.total``, attached to the graph: what it backpropagates."""
    expert: str | None = None
    """The expert the optimizer step trained (expert=both; the loop sets it); None: one."""


@dataclass(frozen=True)
class Draws:
    """One batch's random draws and what they decide, per sample."""

    noise: torch.Tensor
    """(B, C, h, w) or (B, C, F, h, w), on the CPU."""
    timesteps: torch.Tensor
    """(B,) on the device."""
    maps: MaskWeights | None
    """The weight maps m and p of this step's masks (dropped ones all ones), each (B, 1, h, w)
    or (B, 1, F, h, w) float32 on the device; None when masked training is off."""
    needs_teacher: torch.Tensor
    """(B,) bool: the teacher runs on the sample."""
    in_range: torch.Tensor
    """(B,) bool: the sample's noise level lies in the prior's range (the prior term's gate)."""
    sample_weight: torch.Tensor
    """(B,) float32: the sample's concept loss weight."""


@dataclass(frozen=True)
class StepParts:
    """What the step uses, made once per run (:func:`modules.trainer.training_run.build_run`)."""

    family: ModelFamily
    model: LoadedModel
    """The teacher's (the denoiser itself, the LoRA switched off)."""
    student: LoadedModel
    """The model the student's forward goes through (through DDP on several processes)."""
    mask: MaskConfig
    """Whether masks are used, and their dropout."""
    prior: PriorConfig
    """The prior's noise range."""
    generator: torch.Generator
    """Noise and timesteps."""
    mask_rng: random.Random
    """Mask dropout."""
    device: torch.device
    autocast: Callable[[], AbstractContextManager[None]]
    processes: Processes = field(default_factory=Processes)
    """One process unless the run has several."""
    weighting: Weighting = field(init=False)
    """How masks become weight maps: ``Weighting.of(mask, prior)``, made once here."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "weighting", Weighting.of(self.mask, self.prior))


def train_step(batch: Batch, parts: StepParts, prior_weight: float) -> StepResult:
    """One batch: the draws, the teacher where needed, the student, the loss. ``prior_weight``:
    the prior's weight at this step (``prior.schedule``)."""
    family, size = parts.family, batch.latents.shape[0]
    draws = draw(batch, parts, prior_weight)
    teacher_fraction = float(draws.needs_teacher.sum()) / size
    share = parts.processes.split(batch, draws, size)
    mine, drawn = share.batch, share.draws
    latents = mine.latents.to(parts.device)  # (b, C, h, w) or (b, C, F, h, w)
    inputs = with_conditioning(mine.text, mine.conditioning)  # prompt and conditioning
    text = {key: value.to(parts.device) for key, value in inputs.items()}
    noisy, target = family.noisy_input_and_target(
        latents, drawn.noise.to(parts.device), drawn.timesteps
    )

    teacher = None
    index = drawn.needs_teacher.nonzero().squeeze(1).to(parts.device)
    if len(index) > 0:
        with torch.no_grad(), parts.autocast(), lora_disabled(parts.model.denoiser):
            sub = family.predict(
                parts.model, noisy[index], drawn.timesteps[index], select_text(text, index)
            )
        teacher = torch.zeros_like(target, dtype=torch.float32)
        teacher[index] = sub.float()

    with parts.autocast():
        prediction = family.predict(parts.student, noisy, drawn.timesteps, text).float()

    prior_prediction = mine.prior_prediction.to(parts.device)
    if prior_prediction.any():
        # A prior-prediction sample learns the base model's prediction, everywhere.
        shape = (-1,) + (1,) * (target.ndim - 1)
        target = torch.where(prior_prediction.view(shape), teacher, target.float())
    breakdown = prediction_loss(  # the whole batch's: the other processes' samples at 0
        share.place(prediction),
        share.place(target),
        share.whole.maps,
        parts.weighting,
        teacher=share.place(teacher),
        prior_weight=prior_weight,
        sample_weight=share.whole.sample_weight,
        prior_gate=share.whole.in_range,
        layout=family.loss_layout,
    )
    return StepResult(loss=breakdown, teacher_fraction=teacher_fraction, own=breakdown.total)


def draw(batch: Batch, parts: StepParts, prior_weight: float) -> Draws:
    """The batch's noise, timesteps and mask dropouts, and the samples that need the teacher:
    the same on every process."""
    noise = torch.randn(batch.latents.shape, generator=parts.generator)
    timesteps = parts.family.sample_timesteps(
        batch.latents.shape, generator=parts.generator, device=parts.device
    )
    masks = _dropped_masks(batch, parts)
    maps = None if masks is None else parts.weighting.maps(masks)
    maps = _predicted_frames_only(maps, batch.latents.shape, parts)
    needs_teacher = batch.prior_prediction.clone()
    in_range = _in_prior_range(timesteps, batch.latents.shape, parts).cpu()
    if maps is not None and prior_weight > 0:
        needs_teacher |= (maps.prior.flatten(1).amax(dim=1).cpu() > 0) & in_range
    return Draws(noise, timesteps, maps, needs_teacher, in_range, batch.loss_weight)


def _predicted_frames_only(
    maps: MaskWeights | None, shape: torch.Size, parts: StepParts
) -> MaskWeights | None:
    """The maps with weight 0 on the latent frames the model is given rather than predicts
    (the family's optional ``predicted_frames``: WAN TI2V's clean first frame), so that neither
    loss term covers them; unchanged for a family without the hook or when it says None."""
    frames = getattr(parts.family, "predicted_frames", None)
    weights = None if frames is None else frames(shape)
    if weights is None:
        return maps
    weights = weights.to(parts.device, torch.float32).view(1, 1, -1, 1, 1)  # (1, 1, F', 1, 1)
    if maps is None:  # no masks: every predicted frame alike, no prior region
        ones = torch.ones((shape[0], 1, *shape[2:]), device=parts.device)  # (B, 1, F', h, w)
        return MaskWeights(target=ones * weights, prior=torch.zeros_like(ones))
    return MaskWeights(target=maps.target * weights, prior=maps.prior * weights)


def _dropped_masks(batch: Batch, parts: StepParts) -> torch.Tensor | None:
    """This step's masks: per sample dropped to all ones with ``unmasked_probability``.

    Prior-prediction samples also get all ones: their whole image learns the teacher.
    """
    if not parts.mask.enabled:
        return None
    masks = batch.masks.to(parts.device, torch.float32).clone()
    probability = parts.mask.unmasked_probability
    for i in range(masks.shape[0]):
        dropped = probability > 0 and parts.mask_rng.random() < probability
        if dropped or bool(batch.prior_prediction[i]):
            masks[i] = 1.0
    return masks


def _in_prior_range(timesteps: torch.Tensor, shape: torch.Size, parts: StepParts) -> torch.Tensor:
    """(B,) bool: the samples whose noise level lies in ``prior.noise_min``-``noise_max``."""
    prior = parts.prior
    if not prior.gated:
        return torch.ones(timesteps.shape[0], dtype=torch.bool)
    bounds = torch.tensor([prior.noise_min, prior.noise_max])
    low, high = parts.family.timesteps_from_fractions(bounds, shape).tolist()
    return in_noise_range(timesteps.cpu(), low, high)


def mean_result(results: list[StepResult]) -> StepResult:
    """The mean of the batches of one optimizer step (``gradient_accumulation``), detached."""
    if len(results) == 1:
        return results[0]
    mean = {
        name: torch.stack([getattr(r.loss, name).detach().float() for r in results]).mean()
        for name in LossBreakdown.__dataclass_fields__
    }
    fraction = sum(r.teacher_fraction for r in results) / len(results)
    return StepResult(loss=LossBreakdown(**mean), teacher_fraction=fraction)
